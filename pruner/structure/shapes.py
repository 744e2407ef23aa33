"""Rebuilds a pruned model's per-layer shapes from its config (``config.pruner_shapes``).

This file is self-contained (torch + transformers only): :func:`pruner.save_pretrained` copies
it next to exported weights as ``modeling_pruned.py``, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works without this
package. ``pruner.load_pretrained`` uses the same code from the installed package instead, so
loading with the package never executes code from the folder.

``pruner_shapes`` = ``{"params": {name: shape}, "attrs": {module: {attr: value}},
"configs": {module: {key: value}}}``: everything that differs from a dense model built from
the same config.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def apply_shape_spec(model: nn.Module, spec: dict) -> None:
    """Resizes parameters (uninitialised: weights are loaded afterwards) and sets attributes."""
    for name, shape in spec.get("params", {}).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(
            torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
        )
    for module_name, attrs in spec.get("attrs", {}).items():
        module = model.get_submodule(module_name)
        for key, value in attrs.items():
            setattr(module, key, value)
    for module_name, overrides in spec.get("configs", {}).items():
        module = model.get_submodule(module_name)
        cfg = copy.copy(module.config)  # per-layer sizes: the shared config cannot hold them
        cfg._pruner_private = True
        cfg._pruner_keys = set(overrides)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        module.config = cfg


def pruned_class(base: type) -> type:
    """A subclass of the Hugging Face model class ``base`` that builds the pruned shapes."""

    class Pruned(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_shape_spec(self, getattr(config, "pruner_shapes", None) or {})

    Pruned.__name__ = Pruned.__qualname__ = f"Pruned{base.__name__}"
    _share_weight_names(base, Pruned.__name__)
    return Pruned


def _share_weight_names(base: type, name: str) -> None:
    """The checkpoint key renames transformers applies to ``base`` (e.g. GPT-NeoX's saved
    ``embed_out`` is its ``lm_head``), registered for the class ``name`` too: transformers skips
    them for classes outside the library."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers before 5: no renames
        return
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(base.__name__) or (
        conversion_mapping.get_checkpoint_conversion_mapping(model_type) if model_type else None)
    if mapping:
        conversion_mapping.register_checkpoint_conversion_mapping(name, mapping, overwrite=True)
