"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers: full copies of sharded models, and
where a rank's shard of a parameter sits in the full tensor.

Structural surgery needs whole weights, so a sharded model is gathered into an ordinary
(unsharded) copy, pruned, and sharded again by the caller. Gathering is a collective: every rank
must call these functions in the same order. The core stays free of Lightning; these helpers use
plain ``torch.distributed``.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> is_sharded(model)
    False
    >>> copy = unsharded_copy(model)  # works on plain models too (a deep copy through meta)
    >>> bool((copy.model.embed_tokens.weight == model.model.embed_tokens.weight).all())
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import export_shapes
from .io import base_class, clean_config, shape_spec


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by FSDP2 or tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def shard_offset(t: torch.Tensor, dim: int) -> int | None:
    """Where this rank's shard of ``t`` starts along ``dim`` in the full tensor; None when ``dim``
    is not sharded (the shard then holds the whole extent of ``dim``)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not any(isinstance(p, Shard) and p.dim == dim for p in t.placements):
        return None
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[dim])


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` as a full CPU tensor (tied weights once per name).

    Collective for sharded tensors: all ranks must call it. ``keep=False`` takes part in the
    gathers without keeping anything (ranks that do not need the copy), so the extra memory on
    those ranks is one tensor at a time."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    return out


def build_skeleton(model: nn.Module) -> tuple[type, object, dict]:
    """(class, clean config, shape spec) that rebuild ``model``'s architecture, pruned widths
    included, with :func:`skeleton_from`. ``model`` must be a plain (non-peft) HF model;
    sharded is fine (DTensor shapes are the full shapes)."""
    cfg = clean_config(model)
    return base_class(model), cfg, shape_spec(model, cfg)


def skeleton_from(base: type, cfg, spec: dict) -> nn.Module:
    """An HF model of class ``base`` with the widths of ``spec``, on the meta device (no memory)."""
    with torch.device("meta"):
        model = base(copy.deepcopy(cfg))
    export_shapes.apply_shape_spec(model, spec)
    return model


@torch.no_grad()
def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor], buffers_from: nn.Module) -> nn.Module:
    """Loads full tensors into a meta ``skeleton`` (whose parameter names match ``state``), takes
    the non-persistent buffers (e.g. rotary ``inv_freq``, which state dicts omit) from
    ``buffers_from``, and re-ties tied embeddings."""
    skeleton.load_state_dict(state, strict=True, assign=True)
    own = dict(skeleton.named_buffers())
    for name, buf in buffers_from.named_buffers():
        if name in own and own[name].is_meta:
            module_name, _, attr = name.rpartition(".")
            module = skeleton.get_submodule(module_name) if module_name else skeleton
            module._buffers[attr] = local_tensor(buf).detach().to("cpu", copy=True)
    still_meta = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"could not materialize {still_meta[:3]}: no tensor for them in the state dict")
    tie = getattr(skeleton, "tie_weights", None)
    if tie is not None and getattr(getattr(skeleton, "config", None), "tie_word_embeddings", False):
        tie()
    return skeleton


def unsharded_copy(model: nn.Module) -> nn.Module:
    """An ordinary CPU copy of an HF model (sharded by FSDP2 or not), same dtype and widths.
    Collective when sharded: every rank must call it; every rank gets the copy."""
    base, cfg, spec = build_skeleton(model)
    state = full_state_dict(model)
    copy_ = materialize(skeleton_from(base, cfg, spec), state, model)
    copy_.train(model.training)
    return copy_
