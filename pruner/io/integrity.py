"""What a loaded export is checked against: the config it was written with, the weights' shapes
the config implies, and the plan that describes it. An export edited after it was written (a
``hidden_act`` or ``rope_theta`` changed, ``pruner_shapes`` removed, a plan that no longer matches
the weights, a shard index missing) is refused naming what differs, before transformers builds a
model that would silently compute something else.

Example:
    >>> record = config_record({"hidden_act": "silu", "use_cache": True, "rope_theta": 1e4})
    >>> record
    {'hidden_act': 'silu', 'rope_theta': 10000.0}
    >>> edited_keys(record, {"hidden_act": "gelu", "use_cache": False, "rope_theta": 1e4})
    ['hidden_act']
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunerError
from ..structure import Plan, count_parameters, discover

# Keys that change nothing the model computes (or that the loader checks otherwise): edits allowed.
HARMLESS_KEYS = frozenset({
    "transformers_version", "dtype", "torch_dtype", "use_cache", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "architectures", "tokenizer_class", "task_specific_params",
    "problem_type", "id2label", "label2id", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "auto_map", "pruner_shapes", "pruner_modeling_sha256", "pruner_export",
})
SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def config_record(config: dict) -> dict:
    """The config keys that decide what the model computes, as written: kept in the export's
    ``pruner_export`` marker."""
    return {k: v for k, v in config.items() if k not in HARMLESS_KEYS}


def edited_keys(record: dict, config: dict) -> list[str]:
    now = config_record(config)
    return sorted(k for k in set(record) | set(now) if record.get(k) != now.get(k))


def check_config(folder: Path, config: dict, allow_edited: bool) -> None:
    """Refuses a ``config.json`` whose computing keys differ from those the export recorded."""
    record = (config.get("pruner_export") or {}).get("config") if isinstance(config.get("pruner_export"), dict) else None
    if record is None or allow_edited:
        return  # an export of an older version (no record), or the caller accepts the edit
    differ = edited_keys(record, config)
    if differ:
        listed = "; ".join(f"{k}: written {record.get(k)!r}, now {config_record(config).get(k)!r}" for k in differ[:3])
        raise PrunerError(f"{folder / 'config.json'} was edited after pruner exported it ({listed}): the model would "
                          "compute something else than the pruned model; re-export it, or pass "
                          "allow_edited_config=True to load it as edited")


def check_shards(folder: Path, weights: list[Path]) -> None:
    """A sharded checkpoint comes with its index (the map of tensors to shard files)."""
    shards = [w for w in weights if SHARD.search(w.name)]
    if shards and not any(folder.glob("*.safetensors.index.json")):
        raise PrunerError(f"{folder} holds the weight shards {shards[0].name} ... but no model.safetensors.index.json "
                          "(which tensor is in which shard): copy it from where the shards came from, or re-export "
                          "the model")


def check_weight_shapes(folder: Path, weights: list[Path], skeleton: nn.Module, shapes_missing: bool) -> None:
    """Every tensor in the weight files has the shape ``skeleton`` (the model the config builds, on
    the meta device) gives it; ``shapes_missing``: a pruner export whose config has no
    ``pruner_shapes`` (then a mismatch means they were removed)."""
    from safetensors import safe_open

    expected = {n: tuple(t.shape) for n, t in [*skeleton.named_parameters(remove_duplicate=False),
                                                 *skeleton.named_buffers()]}
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    if shapes_missing:
                        raise PrunerError(f"{folder / 'config.json'} has no pruner_shapes, the per-layer widths this "
                                          f"export needs ({name} is {list(shape)} in the weights, "
                                          f"{list(expected[name])} by the config): it was removed or the config "
                                          "replaced; re-export the model")
                    raise PrunerError(f"the weights in {folder} do not match its config.json: {name} is {list(shape)} "
                                      f"in {path.name}, {list(expected[name])} by the config; the config or the "
                                      "weights were edited: re-export the model")


def check_plan(folder: Path, model: nn.Module) -> None:
    """``plan.json`` (when the export has one) describes these weights: its parameter count and,
    layer by layer, how many heads, KV heads and MLP channels it keeps."""
    path = folder / "plan.json"
    if not path.is_file():
        return
    plan = Plan.load(path)
    where = f"{path} does not describe the weights beside it"
    after = plan.params.get("after")
    if isinstance(after, int) and after != count_parameters(model):
        raise PrunerError(f"{where}: it counts {after:,} parameters, the weights hold {count_parameters(model):,}; "
                          "re-export the model (or delete plan.json)")
    alive = [lp for lp in plan.layers if not lp.removed]
    structure = discover(model)
    if len(alive) != len(structure.layers):
        raise PrunerError(f"{where}: it keeps {len(alive)} layers, the weights have {len(structure.layers)}")
    for lp, info in zip(alive, structure.layers):
        found = {"attention_heads_kept": info.attention.num_heads if info.attention else None,
                 "kv_heads_kept": info.attention.num_kv_heads if info.attention else None,
                 "mlp_channels_kept": info.mlp.num_channels if info.mlp else None}
        kept = {"attention_heads_kept": lp.heads_kept, "kv_heads_kept": lp.kv_heads_kept,
                "mlp_channels_kept": lp.mlp_channels_kept}
        for key, listed in kept.items():
            if listed is not None and found[key] is not None and len(listed) != found[key]:
                raise PrunerError(f"{where}: layer {lp.index} keeps {len(listed)} in {key}, the weights have "
                                  f"{found[key]}; re-export the model (or delete plan.json)")
    if plan.hidden_kept is not None and len(plan.hidden_kept) != structure.hidden_size:
        raise PrunerError(f"{where}: it keeps {len(plan.hidden_kept)} hidden channels, the weights have "
                          f"{structure.hidden_size}")


def meta_skeleton(build) -> nn.Module:
    """``build()`` on the meta device (no memory): the shapes a config implies."""
    with torch.device("meta"):
        return build()
