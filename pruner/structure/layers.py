"""The decoder-layer stack of a causal LM: where it is, and which of its layers share a shape (what
:func:`pruner.structure.discover` probes once for all of them).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> path, layers = find_layer_stack(model)
    >>> path, probed_layers(layers)
    ('model.layers', {0})
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ModuleList of same-class blocks holding the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of repeated decoder layers (nn.ModuleList); "
            "only decoder-only transformer causal LMs are supported"
        )
    return best


def layer_signature(layer: nn.Module) -> tuple:
    """A decoder layer's class and parameter shapes (a sharded layer's are its full shapes)."""
    return type(layer), tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())


def probed_layers(layers: nn.ModuleList) -> set[int]:
    """The decoder layers :func:`discover` probes: the first of each :func:`layer_signature`.
    Layers of the same class and parameter shapes run the same code on the same shapes, so their
    coupling is the same: one probe for all of them (30x less work on a 30-layer model)."""
    first: dict[tuple, int] = {}
    for i, layer in enumerate(layers):
        first.setdefault(layer_signature(layer), i)
    return set(first.values())
