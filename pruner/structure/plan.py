"""The pruning plan: the single source of truth for a pruned structure (JSON, no pickle).

Indices always refer to the *original dense* model, so ``apply(plan, dense_model)`` rebuilds
the pruned structure exactly (that is how checkpoints resume and exported folders rebuild).

Example:
    >>> plan = Plan(layers=[LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1])])
    >>> Plan.from_dict(plan.to_dict()).layers[0].heads_kept
    [0, 2]
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PrunerError

FORMAT = "pruner-plan/2"  # groups: one record per family (kind, layer, scores, removed)
OLD_FORMATS = ("pruner-plan/1",)  # groups: one record per group (kind, layer, index, score, removed)


@dataclass
class LayerPlan:
    index: int  # layer index in the dense model
    removed: bool = False
    heads_kept: list[int] | None = None  # query heads (None: all)
    kv_heads_kept: list[int] | None = None  # key/value heads (None: all)
    mlp_channels_kept: list[int] | None = None  # MLP channels (None: all)


@dataclass
class Plan:
    layers: list[LayerPlan]
    hidden_kept: list[int] | None = None  # residual channels kept (channel-wise mode)
    model: dict = field(default_factory=dict)  # dense sizes, model_type, fingerprint
    settings: dict = field(default_factory=dict)  # criterion, aggregation, mode, ...
    params: dict = field(default_factory=dict)  # before, after, removed, removed_fraction
    # every scored family: {"kind", "layer", "scores": [per group], "removed": [per group]}
    groups: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    pruner_version: str = ""
    format: str = FORMAT

    def to_dict(self) -> dict:
        d = asdict(self)
        # readable JSON and the names the report expects
        for layer in d["layers"]:
            layer["attention_heads_kept"] = layer.pop("heads_kept")
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        """The plan of a ``to_dict()`` dict, every field checked (types, ``index`` = position):
        a plan edited by hand or cut short raises :class:`PrunerError` naming the field."""
        if not isinstance(d, dict) or d.get("format") not in (FORMAT, *OLD_FORMATS):
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise PrunerError(f"{source} is not a pruning plan (format {got!r}, expected {FORMAT!r})")
        if d["format"] in OLD_FORMATS and isinstance(d.get("groups"), list):
            d = {**d, "format": FORMAT, "groups": _families_of(d["groups"])}
        raw_layers = d.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise PrunerError(f"{source}: 'layers' must be a non-empty list of layer entries, got {raw_layers!r:.80}")
        layers = []
        for position, raw in enumerate(raw_layers):
            where = f"{source}: layers[{position}]"
            if not isinstance(raw, dict):
                raise PrunerError(f"{where} must be an object, got {raw!r:.80}")
            raw = dict(raw)
            raw["heads_kept"] = raw.pop("attention_heads_kept", raw.get("heads_kept"))
            index = raw.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index != position:
                raise PrunerError(f"{where}.index is {index!r}: entries must be in layer order with index equal to "
                                  "their position (0, 1, 2, ...); the plan was reordered or edited")
            removed = raw.get("removed", False)
            if not isinstance(removed, bool):
                raise PrunerError(f"{where}.removed must be true or false, got {removed!r}")
            for key in ("heads_kept", "kv_heads_kept", "mlp_channels_kept"):
                kept = raw.get(key)
                if kept is not None and (not isinstance(kept, list) or not all(
                        isinstance(k, int) and not isinstance(k, bool) for k in kept)):
                    name = "attention_heads_kept" if key == "heads_kept" else key
                    raise PrunerError(f"{where}.{name} must be a list of integer indices or null, got {kept!r:.80}")
            layers.append(LayerPlan(index, removed, raw.get("heads_kept"), raw.get("kv_heads_kept"),
                                    raw.get("mlp_channels_kept")))
        hidden = d.get("hidden_kept")
        if hidden is not None and (not isinstance(hidden, list) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in hidden)):
            raise PrunerError(f"{source}: hidden_kept must be a list of integer indices or null, got {hidden!r:.80}")
        for key, kind in (("model", dict), ("settings", dict), ("params", dict), ("calibration", dict),
                          ("groups", list), ("pruner_version", str)):
            if key in d and not isinstance(d[key], kind):
                raise PrunerError(f"{source}: {key!r} must be a JSON {'object' if kind is dict else kind.__name__}, "
                                  f"got {type(d[key]).__name__}")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("layers", "hidden_kept")}
        return cls(layers=layers, hidden_kept=hidden, **fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the plan atomically (temporary file, then rename)."""
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write the plan to {path}: the folder {path.parent} does not exist; "
                                    "create it first")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            from ..checks import current_umask

            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the plan from other accounts
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        if not isinstance(path, (str, os.PathLike)):
            raise PrunerError(f"the plan path must be a path to plan.json, got {type(path).__name__}")
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PrunerError(f"{path} is not valid JSON ({e}); was it written completely?") from e
        return cls.from_dict(data, source=str(path))

    def group_records(self):
        """Every scored group as ``{"kind", "layer", "index", "score", "removed"}`` (a view of the
        per-family ``groups``)."""
        for family in self.groups:
            for i, (score, removed) in enumerate(zip(family["scores"], family["removed"])):
                yield {"kind": family["kind"], "layer": family["layer"], "index": i, "score": score,
                       "removed": removed}

    @property
    def is_identity(self) -> bool:
        return self.hidden_kept is None and all(
            not lp.removed and lp.heads_kept is None and lp.kv_heads_kept is None and lp.mlp_channels_kept is None
            for lp in self.layers
        )


def sync_group_records(plan: Plan) -> None:
    """Sets the group records' ``removed`` flags from the plan's kept lists (after a step such as
    :func:`pruner.selection.measured.refine_attention` re-chose which heads or channels go)."""
    kept_of = {"attention_head": "heads_kept", "kv_group": "kv_heads_kept", "mlp_channel": "mlp_channels_kept"}
    by_layer = {lp.index: lp for lp in plan.layers}
    for family in plan.groups or []:
        lp, field_name = by_layer.get(family["layer"]), kept_of.get(family["kind"])
        kept = getattr(lp, field_name) if lp is not None and field_name else None
        if kept is not None:
            keep = set(kept)
            family["removed"] = [i not in keep for i in range(len(family["scores"]))]


def _families_of(records: list) -> list[dict]:
    """Per-group records of an older plan (``pruner-plan/1``) as per-family records."""
    families: dict[tuple, dict] = {}
    for r in records:
        if not isinstance(r, dict):
            raise PrunerError(f"plan: a group record must be an object, got {r!r:.80}")
        key = (r.get("kind"), r.get("layer"))
        family = families.setdefault(key, {"kind": key[0], "layer": key[1], "scores": [], "removed": []})
        family["scores"].append(r.get("score"))
        family["removed"].append(bool(r.get("removed")))
    return list(families.values())
