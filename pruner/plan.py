"""The pruning plan: the single source of truth for a pruned structure (JSON, no pickle).

Indices always refer to the *original dense* model, so ``apply(plan, dense_model)`` rebuilds
the pruned structure exactly (that is how checkpoints resume and exported folders rebuild).

Example:
    >>> plan = Plan(layers=[LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1])])
    >>> Plan.from_dict(plan.to_dict()).layers[0].heads_kept
    [0, 2]
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PrunerError

FORMAT = "pruner-plan/1"


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
    groups: list[dict] = field(default_factory=list)  # every scored group: kind, layer, index, score, removed
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
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != FORMAT:
            raise PrunerError(f"not a pruning plan (format {d.get('format')!r}, expected {FORMAT!r})")
        layers = []
        for raw in d["layers"]:
            raw = dict(raw)
            raw["heads_kept"] = raw.pop("attention_heads_kept", raw.get("heads_kept"))
            layers.append(LayerPlan(**{k: raw.get(k) for k in LayerPlan.__dataclass_fields__ if k in raw}))
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "layers"}
        return cls(layers=layers, **fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the plan atomically (temporary file, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PrunerError(f"{path} is not valid JSON ({e}); was it written completely?") from e
        return cls.from_dict(data)

    @property
    def is_identity(self) -> bool:
        return self.hidden_kept is None and all(
            not lp.removed and lp.heads_kept is None and lp.kv_heads_kept is None and lp.mlp_channels_kept is None
            for lp in self.layers
        )


def model_fingerprint(model) -> str:
    """A cheap, deterministic fingerprint of a model: parameter names, shapes and the first
    values of each, rounded to bfloat16 so that the same weights in fp32, bf16 or fp16 agree."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        h.update(flat[: min(8, flat.numel())].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def sync_group_records(plan: Plan) -> None:
    """Sets the per-group records' ``removed`` flags from the plan's kept lists (after a step
    such as :func:`pruner.refine.refine_attention` re-chose which heads or channels go)."""
    kept_of = {"attention_head": "heads_kept", "kv_group": "kv_heads_kept", "mlp_channel": "mlp_channels_kept"}
    by_layer = {lp.index: lp for lp in plan.layers}
    for r in plan.groups or []:
        lp, field_name = by_layer.get(r["layer"]), kept_of.get(r["kind"])
        kept = getattr(lp, field_name) if lp is not None and field_name else None
        if kept is not None:
            r["removed"] = r["index"] not in kept
