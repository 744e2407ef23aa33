"""Weights written as they come: ``(name, tensor)`` pairs into safetensors shards, named and indexed
as transformers names them, so that an export never needs the whole model in memory (FSDP2's
export gathers one decoder layer at a time on rank 0).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))
    >>> folder = Path(tempfile.mkdtemp())
    >>> files = write_weights(model, model.state_dict().items(), folder, max_shard_bytes=40_000)
    >>> files[0], (folder / "model.safetensors.index.json").is_file(), "lm_head.weight" in saved_names(model)
    ('model-00001-of-00003.safetensors', True, False)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunerError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def saved_names(model: nn.Module) -> list[str]:
    """The state-dict names transformers writes for ``model`` (meta tensors are fine): one name of
    each tied pair, the one its loader expects."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return list(remove_tied_weights_from_state_dict(dict(model.state_dict()), model))


def _original_format(model: nn.Module, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' own renaming back to the checkpoint format, shard by shard (as it does for an
    offloaded model): none for most dense families."""
    try:
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings
        return shard
    return revert_weight_conversion(model, shard)


def write_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], folder: Path,
                  max_shard_bytes: int = 2 * 2**30) -> list[str]:
    """Writes the ``(name, full tensor)`` pairs of ``model``'s state dict (``model`` may be on the
    meta device: it gives the names and ties) into ``folder`` as they come, a shard whenever the
    next tensor would take the current one past ``max_shard_bytes``: ``model.safetensors`` when
    one shard holds all, else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
    Names transformers does not save (tied aliases) are skipped; a missing one is an error.
    Returns the file names, in order."""
    from safetensors.torch import save_file

    wanted = saved_names(model)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        converted = _original_format(model, shard)
        path = folder / f".shard-{len(written):05d}.safetensors.partial"
        save_file({k: v.contiguous() for k, v in converted.items()}, str(path), metadata={"format": "pt"})
        written.append((path, list(converted)))

    seen = set()
    for name, tensor in tensors:
        if name not in wanted or name in seen:
            continue
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.detach().cpu()
        size, total = size + nbytes, total + nbytes
    missing = [n for n in wanted if n not in seen]
    if missing:
        raise PrunerError(f"no weights came for {missing[:3]} ({len(missing)} in all): the export would be incomplete")
    if shard:
        flush()
    n = len(written)
    names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (path, _), name in zip(written, names):
        path.rename(folder / name)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for (_, keys), name in zip(written, names) for k in keys}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names
