"""What a pruned model's shapes are, relative to a dense model built from its config.

``shape_spec`` is what :func:`pruner.save_pretrained` writes as ``config.pruner_shapes`` and
what :mod:`pruner.structure.shapes` applies when a pruned folder loads; ``base_class`` and
``clean_config`` give the transformers class and config the dense skeleton is built from.

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> shape_spec(model, clean_config(model))  # nothing differs from the dense model
    {}
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

from ..errors import PrunerError


def base_class(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise PrunerError(f"{type(model).__name__} is not a transformers model class: cannot export it")


def clean_config(model: nn.Module):
    cfg = copy.deepcopy(model.config)
    for key in ("pruner_shapes", "auto_map", "pruner_base_class", "_pruner_private"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    return cfg


def uniform_config(model: nn.Module, cfg) -> None:
    """Moves per-layer sizes into the global config where every layer agrees."""
    private = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_pruner_private", False)]
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        owners = [c for c in private if key in getattr(c, "_pruner_keys", ())]
        values = {getattr(c, key) for c in owners}
        if len(owners) == cfg.num_hidden_layers and len(values) == 1:  # every layer agrees
            setattr(cfg, key, values.pop())
    if private and getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = private[0].head_dim


def shape_spec(model: nn.Module, cfg) -> dict:
    """What differs between ``model`` and a dense model built from ``cfg`` (on the meta device)."""
    base = base_class(model)
    with torch.device("meta"):
        dense = base(copy.deepcopy(cfg))
    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    spec: dict = {"params": {}, "attrs": {}, "configs": {}}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in dense_params:
            raise PrunerError(f"parameter {name} has no counterpart in a {base.__name__} built from the config")
        if tuple(dense_params[name].shape) != tuple(p.shape):
            spec["params"][name] = list(p.shape)
    dense_modules = dict(dense.named_modules())
    for name, mod in model.named_modules():
        ref = dense_modules.get(name)
        if ref is None:
            continue
        for key, value in vars(mod).items():
            if key.startswith("_") or key == "training" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and getattr(ref, key, None) != value:
                spec["attrs"].setdefault(name, {})[key] = value
        sub = getattr(mod, "config", None)
        if getattr(sub, "_pruner_private", False):
            diff = {k: getattr(sub, k) for k in getattr(sub, "_pruner_keys", ())
                    if getattr(sub, k) != getattr(cfg, k, None)}
            if diff:
                spec["configs"][name] = diff
    return {k: v for k, v in spec.items() if v}
