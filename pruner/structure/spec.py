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


def config_problem(cfg, values: dict) -> str | None:
    """Why ``cfg``'s class would refuse ``cfg`` with ``values`` set (its own validators, e.g.
    transformers' "hidden size is not a multiple of the number of attention heads", which
    holds even where ``head_dim`` is explicit); None when it accepts them."""
    trial = copy.deepcopy(cfg)
    for key, value in values.items():
        setattr(trial, key, value)
    validate = getattr(trial, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as err:  # noqa: BLE001  (huggingface_hub's StrictDataclassClassValidationError, ValueError)
        return str(err.__cause__ or err).strip().splitlines()[-1].strip()
    return None


def settable(obj, key: str) -> bool:
    """Whether ``obj.key`` can be assigned (Falcon's ``head_dim`` is a property of the config)."""
    prop = getattr(type(obj), key, None)
    return not (isinstance(prop, property) and prop.fset is None)


def plain_config_problem(model: nn.Module, consumer: str, values: dict) -> str | None:
    """Why ``model``'s config with ``values`` (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``) cannot describe the pruned layers as a plain config: the class's validators
    refuse it, or a model built from it has another attention width (the family derives the head
    size from hidden_size / num_attention_heads, as GPT-NeoX and Falcon do). ``consumer``: the
    attention's output projection in layer 0. None when it can."""
    cfg = model.config
    problem = config_problem(cfg, {k: v for k, v in values.items() if settable(cfg, k)})
    if problem is not None:
        return problem
    rebuilt = _one_layer_model(model, cfg, values)
    if rebuilt is None:  # a config this check cannot build says nothing either way
        return None
    rebuilt = rebuilt.get_submodule(consumer)
    wanted = values["num_attention_heads"] * values["head_dim"]
    if getattr(rebuilt, "in_features", wanted) != wanted:
        return (f"a {type(cfg).__name__} with {values['num_attention_heads']} heads builds attention "
                f"{rebuilt.in_features} wide, not {wanted}: the family derives the head size from "
                "hidden_size / num_attention_heads")
    return None


def _one_layer_model(model: nn.Module, cfg, values: dict) -> nn.Module | None:
    """``model``'s class built on the meta device from ``cfg`` with ``values`` (those it can
    set) and one decoder layer; None when that config cannot build one."""
    trial = copy.deepcopy(cfg)
    for key, value in values.items():
        if settable(trial, key):
            setattr(trial, key, value)
    trial.num_hidden_layers = 1
    if isinstance(getattr(trial, "layer_types", None), list):
        trial.layer_types = trial.layer_types[:1]
    try:
        with torch.device("meta"):
            return base_class(model)(trial)
    except Exception:  # noqa: BLE001  (any validator or constructor error: the config cannot build it)
        return None


def uniform_config(model: nn.Module, cfg) -> None:
    """Moves per-layer sizes into the global config where every layer agrees and the config's
    class accepts them; otherwise they stay per layer (``pruner_shapes``)."""
    private = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_pruner_private", False)]
    agreed = {}
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        owners = [c for c in private if key in getattr(c, "_pruner_keys", ())]
        values = {getattr(c, key) for c in owners}
        if len(owners) == cfg.num_hidden_layers and len(values) == 1:  # every layer agrees
            agreed[key] = values.pop()
    if private and getattr(cfg, "head_dim", None) is None and settable(cfg, "head_dim"):
        cfg.head_dim = private[0].head_dim
    if agreed and not _describes(model, cfg, agreed):  # e.g. 3 heads of a 640-wide Gemma 3, GPT-NeoX's heads
        agreed = {k: v for k, v in agreed.items() if k == "intermediate_size"}  # heads stay per layer
        if agreed and not _describes(model, cfg, agreed):
            agreed = {}
    for key, value in agreed.items():
        setattr(cfg, key, value)


def _describes(model: nn.Module, cfg, values: dict) -> bool:
    """Whether ``cfg`` with ``values`` passes its class's validators and builds the first decoder
    layer (and the model-level buffers, e.g. a rotary embedding's) with ``model``'s shapes."""
    if config_problem(cfg, values) is not None:
        return False
    from .layers import find_layer_stack

    rebuilt = _one_layer_model(model, cfg, values)
    if rebuilt is None:  # a config that cannot build a model describes nothing
        return False
    layers_path, _ = find_layer_stack(model)
    inside = layers_path + "."
    first = inside + "0."
    mine = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, tensor in [*rebuilt.named_parameters(), *rebuilt.named_buffers()]:
        if name.startswith(inside) and not name.startswith(first):
            continue
        if name in mine and tuple(mine[name]) != tuple(tensor.shape):
            return False
    return True


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
