"""FSDP2 (``torch.distributed.fsdp.fully_shard``): copies of sharded models (whole, partial or
weightless) and pruned skeletons to load them into.

Discovery probes a partial copy (:func:`discovery_copy`); the paper's pipeline plans surgery on a
weightless one (:func:`meta_copy`, then :mod:`pruner.distributed.sliced` fills the pruned shards);
what reads whole layers of the dense weights (the refit, a distillation teacher) takes an
:func:`unsharded_copy`, pruned and sharded again by the caller. Gathering is a collective: every
rank must call these functions in the same order. Plain ``torch.distributed``, no Lightning.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> from pruner.distributed.dtensor import is_sharded
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

from ..structure import shapes
from ..structure.spec import base_class, clean_config, shape_spec
from .dtensor import local_tensor


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
    shapes.apply_shape_spec(model, spec)
    return model


@torch.no_grad()
def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor], buffers_from: nn.Module,
                partial: bool = False) -> nn.Module:
    """Loads full tensors into a meta ``skeleton`` (whose parameter names match ``state``), takes
    the non-persistent buffers (e.g. rotary ``inv_freq``, which state dicts omit) from
    ``buffers_from``, and re-ties tied embeddings. ``partial``: ``state`` holds only some of
    the tensors; the others stay on the meta device."""
    skeleton.load_state_dict(state, strict=not partial, assign=True)
    own = dict(skeleton.named_buffers())
    for name, buf in buffers_from.named_buffers():
        if name in own and own[name].is_meta:
            module_name, _, attr = name.rpartition(".")
            module = skeleton.get_submodule(module_name) if module_name else skeleton
            module._buffers[attr] = local_tensor(buf).detach().to("cpu", copy=True)
    still_meta = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if still_meta and not partial:
        raise RuntimeError(f"could not materialize {still_meta[:3]}: no tensor for them in the state dict")
    tie = getattr(skeleton, "tie_weights", None)
    if tie is not None and getattr(getattr(skeleton, "config", None), "tie_word_embeddings", False):
        tie()
    return skeleton


def meta_copy(model: nn.Module) -> nn.Module:
    """``model``'s architecture and widths on the meta device (no weights, no collective): what
    a sharded model's surgery plans on (:func:`pruner.structure.pruned_sources` gives the values)."""
    copy_ = skeleton_from(*build_skeleton(model))
    copy_.train(model.training)
    return copy_


def discovery_copy(model: nn.Module) -> nn.Module:
    """An ordinary CPU copy of ``model`` holding only what :func:`pruner.structure.discover`
    reads: the modules outside the decoder layers (the output layer only where tied to the
    input embedding) and the decoder layers up to the last one it probes (the first of each
    shape; its forward pass runs the layers before it): layer 0 alone for a model of equal
    layers. Every other weight stays on the meta device (non-persistent buffers are copied).
    Every tensor is checked for NaN/inf: the copied ones whole as they pass, the others shard by
    shard with one all-reduce of the findings, so all ranks refuse together. Collective when
    sharded, one copied tensor at a time: no rank holds (or gathers) the whole model.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> probe = discovery_copy(model)
        >>> probe.model.layers[0].mlp.up_proj.weight.is_meta, probe.model.layers[2].mlp.up_proj.weight.is_meta
        (False, True)
    """
    from ..checks import check_finite_tensor
    from ..structure.layers import find_layer_stack, probed_layers

    layers_path, layers = find_layer_stack(model)
    probed = tuple(f"{layers_path}.{i}." for i in range(max(probed_layers(layers)) + 1))
    head = model.get_output_embeddings()
    untied_head = head is not None and head.weight is not model.get_input_embeddings().weight
    names = {id(m): n for n, m in model.named_modules()}
    skip_head = f"{names[id(head)]}." if untied_head else None

    def wanted(name: str) -> bool:
        if name.startswith(layers_path + "."):
            return name.startswith(probed)
        return skip_head is None or not name.startswith(skip_head)

    state: dict[str, torch.Tensor] = {}
    shards: list[tuple[str, torch.Tensor]] = []  # checked on each rank, then the findings summed
    for name, t in model.state_dict(keep_vars=True).items():
        if not wanted(name) and hasattr(t, "to_local"):
            shards.append((name, t))
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        check_finite_tensor(name, full)
        if wanted(name):
            state[name] = full.detach().to("cpu", copy=True)
    check_finite_shards(shards)
    copy_ = materialize(skeleton_from(*build_skeleton(model)), state, model, partial=True)
    copy_.train(model.training)
    return copy_


def unsharded_copy(model: nn.Module) -> nn.Module:
    """An ordinary CPU copy of an HF model (sharded by FSDP2 or not), same dtype and widths.
    Collective when sharded: every rank must call it; every rank gets the copy."""
    base, cfg, spec = build_skeleton(model)
    state = full_state_dict(model)
    copy_ = materialize(skeleton_from(base, cfg, spec), state, model)
    copy_.train(model.training)
    return copy_


def check_finite_shards(named: list[tuple[str, torch.Tensor]]) -> None:
    """Refuses, on every rank, DTensors holding NaN/inf in any rank's shard: each rank checks its
    own shards, one all-reduce of the findings (collective when ``named`` is not empty)."""
    if not named:
        return
    import torch.distributed as dist

    from ..checks import broken_weight

    local = [local_tensor(t).detach() for _, t in named]
    bad = torch.tensor([float(x.is_floating_point() and not bool(torch.isfinite(x).all())) for x in local],
                       device=local[0].device)
    groups = {id(t.device_mesh): t.device_mesh for _, t in named}
    for mesh in groups.values():  # (one mesh under FSDP2)
        for dim in range(mesh.ndim):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    for (name, _), flag in zip(named, bad.tolist()):
        if flag:
            raise broken_weight(name)
