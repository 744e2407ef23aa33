"""FSDP2 surgery without gathering the whole model: the pruned model is planned on the meta
device (:func:`~pruner.distributed.gather.meta_copy` + ``apply_plan``: its widths, attributes
and config), sharded there by the caller, and each of its shards filled from the dense shards
one tensor at a time (:func:`fill_pruned`): a rank holds its shards of both models and one full
tensor, never the whole model. Plain ``torch.distributed``, no Lightning.

The flow (the callback's prune step; ``dense`` is sharded, the plan made from its scores)::

    pruned = meta_copy(dense)
    apply_plan(plan, pruned, structure)                 # shapes and attributes, no values
    lora = parameters_made_by(pruned, attach_lora)      # seeded LoRA values, before sharding
    ... fully_shard(pruned) ...
    allocate(pruned, device)
    fill_pruned(pruned, dense, plan, structure, lora)

Example (one process: plain tensors play the shards):
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from pruner.structure import LayerPlan, Plan, apply_plan, discover
    >>> from pruner.distributed.gather import meta_copy
    >>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> structure = discover(dense)
    >>> plan = Plan([LayerPlan(0, mlp_channels_kept=list(range(0, 64, 2)))])
    >>> pruned = meta_copy(dense)
    >>> _ = apply_plan(plan, pruned, structure, check_fingerprint=False)
    >>> allocate(pruned, "cpu")
    >>> fill_pruned(pruned, dense, plan, structure)
    >>> bool((pruned.model.layers[0].mlp.up_proj.weight == dense.model.layers[0].mlp.up_proj.weight[::2]).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..structure.groups import ModelStructure
from ..structure.plan import Plan
from ..structure.surgery import kept_layer_name, pruned_sources
from .dtensor import local_part, local_tensor

LORA_WRAPPED = ".base_layer."  # peft's name for the layer its adapters wrap


def parameters_made_by(model: nn.Module, make: Callable[[nn.Module], None]) -> dict[str, torch.Tensor]:
    """Runs ``make(model)`` on a meta-device ``model`` and returns the values of the parameters it
    added (by name), every parameter left on the meta device. During the call each meta
    parameter has a zero-memory CPU stand-in, so that code which creates parameters beside them
    on their device (peft's LoRA layers) draws real values, from the same random stream as on
    a real model.

    Example:
        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.Linear(3, 2))
        >>> made = parameters_made_by(model, lambda m: m.append(nn.Linear(2, 1)))
        >>> sorted(made), model[1].weight.is_meta
        (['1.bias', '1.weight'], True)
    """
    before = set()
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and p.is_meta:
                before.add(id(p))
                stand_in = torch.zeros((), dtype=p.dtype).expand(p.shape)  # no storage of its shape
                module._parameters[attr] = _StandIn(stand_in, p)
    try:
        make(model)
    finally:
        made: dict[str, torch.Tensor] = {}
        for module_name, module in model.named_modules():
            for attr, p in module._parameters.items():
                if isinstance(p, _StandIn):  # back to meta, frozen or not as ``make`` left it
                    module._parameters[attr] = p.meta.requires_grad_(p.requires_grad)
                elif p is not None and id(p) not in before and not p.is_meta:
                    made[f"{module_name}.{attr}" if module_name else attr] = p.detach().clone()
                    module._parameters[attr] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    return made


class _StandIn(nn.Parameter):
    """A zero-stride CPU parameter standing in for the meta parameter ``meta``."""

    def __new__(cls, data: torch.Tensor, meta: nn.Parameter):
        out = super().__new__(cls, data, requires_grad=meta.requires_grad)
        out.meta = meta
        return out


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Memory for every parameter and buffer of a meta-device (or meta-sharded) ``model`` on
    ``device``, values undefined; tied input/output embeddings stay one tensor (``to_empty``
    gives each module its own on an unsharded model)."""
    model.to_empty(device=device)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and head is not None and head.weight is not embedding.weight:
        model.tie_weights()


@torch.no_grad()
def fill_pruned(pruned: nn.Module, dense: nn.Module, plan: Plan, structure: ModelStructure,
                values: dict[str, torch.Tensor] | None = None) -> None:
    """Writes every parameter and buffer of ``pruned`` (``plan`` applied to a meta copy of
    ``dense``, then allocated, e.g. by ``to_empty``: its values undefined; sharded by FSDP2 or
    not) from ``dense`` (sharded or not; ``structure`` its discovered structure): a parameter
    named in ``values`` takes that full tensor, any other the slice of its dense tensor that
    :func:`~pruner.structure.pruned_sources` names, gathered one at a time (collective: every
    rank must call this in the same state); buffers are copied, decoder layers renumbered. A value
    may be a DTensor (:class:`~pruner.distributed.window.LayerWindow`'s shards): its shards are
    copied, or gathered (one tensor) where ``pruned`` lays the parameter out otherwise; a name in
    ``values`` may omit peft's ``.base_layer``."""
    values = values or {}
    sources = pruned_sources(plan, structure)
    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    for name, p in pruned.named_parameters():  # the same order on every rank
        value = values.get(name, values.get(name.replace(LORA_WRAPPED, ".")))
        local = local_tensor(p)
        if value is not None and _laid_out_alike(value, p):  # a DTensor with p's layout: its shards
            local.copy_(value.to_local().to(local.device))
            continue
        if value is not None:  # laid out otherwise (or plain): this one full tensor
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
        else:
            source = sources[name.replace(LORA_WRAPPED, ".")]
            d = dense_params[source.name]
            full = source.take(d.full_tensor() if hasattr(d, "full_tensor") else d)
        local.copy_(local_part(full, p).to(local.device))
    dense_buffers = {kept_layer_name(n, plan, structure): b for n, b in dense.named_buffers()}
    for name, buf in pruned.named_buffers():
        source = dense_buffers.get(name.replace(LORA_WRAPPED, "."))
        if source is None:
            raise RuntimeError(f"buffer {name} of the pruned model has no counterpart in the dense model")
        local_tensor(buf).copy_(local_tensor(source).to(buf.device))


def _laid_out_alike(value: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether DTensor ``value`` has DTensor ``p``'s mesh and placements (its shards fit p's)."""
    return (hasattr(value, "to_local") and hasattr(p, "device_mesh")
            and (value.device_mesh, value.placements) == (p.device_mesh, p.placements))
