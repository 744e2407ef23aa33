"""Selection: group scores + target -> which groups go (a :class:`Plan` relative to the model).

Removal happens in *units* whose cost in parameters is exact: one query head from every KV
group of a layer at once (GQA stays uniform), one KV group, ``round_to`` MLP channels, one
hidden channel block, one layer. *Local* selection removes the same fraction of units in every
eligible layer (the paper); *global* selection ranks every unit of every layer by score per
parameter and removes the cheapest first, so layers that matter less lose more.
A fraction of total parameters (``target_sparsity``) is met as closely as the units allow.

Everything is vectorised over units (a :class:`Pool` holds one family's units as tensors): a
LLaMA-70B-shaped plan (80 layers x 28,672 MLP channels) is selected in about a second.

Example:
    >>> import torch
    >>> pool = Pool("mlp", 0, torch.tensor([0.1, 0.5]), torch.tensor([10, 10]), torch.tensor([3, 0]),
    ...             torch.tensor([0, 1, 2]), full_units=3)
    >>> other = Pool("mlp", 1, torch.tensor([0.2]), torch.tensor([10]), torch.tensor([1]), torch.tensor([0, 1]),
    ...              full_units=2)
    >>> [(p.layer, c.tolist()) for p, c in zip([pool, other], cheapest_first([pool, other], budget=20))]
    [(0, [True, False]), (1, [True])]
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass

import torch

from ..config import PruneConfig
from ..errors import PrunerError
from ..importance import family_scores
from ..structure import LayerPlan, ModelStructure, Plan

KINDS = {"heads": "attention_head", "kv": "kv_group", "mlp": "mlp_channel", "hidden": "hidden_channel",
         "layer": "layer"}  # unit kind -> the kind of group its items are


@dataclass
class Pool:
    """The units of one family (e.g. the MLP channels of layer 5), in removal order (lowest
    score first): unit ``u`` removes groups ``items[bounds[u]:bounds[u + 1]]``."""

    kind: str  # "heads" | "kv" | "mlp" | "hidden" | "layer"
    layer: int | None
    scores: torch.Tensor  # (n_units,) fp64: the sum of the unit's group scores
    costs: torch.Tensor  # (n_units,) int64: parameters the unit removes
    items: torch.Tensor  # (n_items,) int64: group indices, unit after unit
    bounds: torch.Tensor  # (n_units + 1,) int64
    full_units: int  # how many units a per-layer ratio applies to (the unit that must stay included)

    def __len__(self) -> int:
        return len(self.costs)

    def removed_items(self, chosen: torch.Tensor) -> torch.Tensor:
        """Group indices removed by the units where the boolean ``chosen`` is True."""
        sizes = self.bounds[1:] - self.bounds[:-1]  # (n_units,)
        return self.items[torch.repeat_interleave(chosen, sizes)]


def in_range(r: tuple[int, int] | None, i: int) -> bool:
    """Whether layer ``i`` lies in the half-open range ``r`` (None = every layer)."""
    return r is None or r[0] <= i < r[1]


def _ordered_pool(scores: torch.Tensor, kind: str, layer: int | None, unit_size: int, cost_each: int,
                  max_units: int, full_units: int | None = None) -> Pool:
    """Groups sorted by score, packed into units of ``unit_size`` (the first absorbs any remainder)."""
    order = scores.argsort(stable=True)  # stable: deterministic ties
    n = len(order)
    first = n % unit_size or unit_size
    n_units = min(1 + (n - first) // unit_size, max_units)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long),
                        first + unit_size * torch.arange(n_units, dtype=torch.long)]) if n_units else \
        torch.zeros(1, dtype=torch.long)
    items = order[: int(bounds[-1])]
    sizes = bounds[1:] - bounds[:-1]
    sorted_scores = scores[items]
    if unit_size == 1:
        unit_scores = sorted_scores.clone()
    else:  # the first unit, then the equal-sized rest: (n_units - 1, unit_size) rows
        rest = sorted_scores[first:].reshape(-1, unit_size).sum(1) if n_units > 1 else sorted_scores[:0]
        unit_scores = torch.cat([sorted_scores[:first].sum().reshape(1), rest]) if n_units else sorted_scores[:0]
    # a per-layer ratio applies to every unit, the one that must stay included
    return Pool(kind, layer, unit_scores, sizes * cost_each, items, bounds,
                n_units + 1 if full_units is None else full_units)


def _query_head_pool(head_scores: torch.Tensor, n_kv: int, cost_per_head: int, layer: int, max_units: int) -> Pool:
    """Unit k removes the k-th least important query head of every KV group (uniform GQA)."""
    n_rep = len(head_scores) // n_kv
    per_group = head_scores.view(n_kv, n_rep)  # (n_kv, n_rep)
    order = per_group.argsort(dim=1, stable=True)  # (n_kv, n_rep)
    n_units = min(n_rep - 1, max_units)
    items = (torch.arange(n_kv).unsqueeze(1) * n_rep + order[:, :n_units]).T.contiguous()  # (n_units, n_kv)
    scores = head_scores[items].sum(1) if n_units else head_scores[:0]
    return Pool("heads", layer, scores, torch.full((n_units,), cost_per_head * n_kv, dtype=torch.long),
                items.reshape(-1), torch.arange(0, n_units * n_kv + 1, n_kv, dtype=torch.long), n_rep)


def check_prunable(structure: ModelStructure, cfg: PruneConfig) -> None:
    """Before any pass: block mode on a model whose heads cannot be removed (coupled) prunes its
    MLP channels only, said once; with ``prune_mlp=False`` there is nothing to prune."""
    if cfg.mode == "block" and cfg.prune_attention and structure.attention_problem:
        if not cfg.prune_mlp:
            raise PrunerError(f"{structure.attention_problem}; with prune_mlp=False nothing is left to prune")
        warnings.warn(f"{structure.attention_problem}: pruning MLP channels only", stacklevel=3)


def candidate_pools(structure: ModelStructure, vectors, cfg: PruneConfig) -> tuple[list[Pool], list[dict]]:
    """Units per pool (each pool is removed lowest-first) and every family's group scores for
    the plan (``{"kind", "layer", "scores"}``)."""
    shapes = structure.shapes
    pools: list[Pool] = []
    records: list[dict] = []
    cap = lambda n: max(int(n * cfg.max_layer_ratio), 0) if cfg.global_ranking else n  # noqa: E731

    def record(kind, layer, scores):
        records.append({"kind": kind, "layer": layer, "scores": scores})

    if cfg.mode == "block":
        for info in structure.layers:
            a, m = info.attention, info.mlp
            if a is not None and cfg.prunes("attention", info.index):
                n_rep = a.num_heads // a.num_kv_heads
                if cfg.head_granularity == "query" and n_rep > 1:
                    s = family_scores(a.heads, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                    record("attention_head", info.index, s)
                    pools.append(_query_head_pool(s, a.num_kv_heads, a.heads.params_per_group(shapes), info.index,
                                                  cap(n_rep - 1)))
                else:
                    s = family_scores(a.kv_groups, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                    record("kv_group", info.index, s)
                    pools.append(_ordered_pool(s, "kv", info.index, 1, a.kv_groups.params_per_group(shapes),
                                               cap(a.num_kv_heads - 1), a.num_kv_heads))
            if m is not None and cfg.prunes("mlp", info.index):
                s = family_scores(m.channels, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                record("mlp_channel", info.index, s)
                step = cfg.rounding(m.num_channels)
                n_units = (m.num_channels - 1) // step  # keep at least one unit
                pools.append(_ordered_pool(s, "mlp", info.index, step, m.channels.params_per_group(shapes),
                                           cap(n_units)))
    elif cfg.mode == "channel":
        fam = structure.hidden_family()
        s = family_scores(fam, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
        record("hidden_channel", None, s)
        step = cfg.rounding(structure.hidden_size)
        pools.append(_ordered_pool(s, "hidden", None, step, fam.params_per_group(shapes),
                                   (structure.hidden_size - 1) // step))
    else:
        eligible = [info for info in structure.layers if in_range(cfg.layers, info.index)]
        scores = torch.stack([
            family_scores(structure.layer_family(info), vectors, cfg.criterion, cfg.aggregation, cfg.seed)[0]
            for info in eligible
        ])
        for info, sc in zip(eligible, scores):
            record("layer", info.index, sc.reshape(1))
        costs = torch.tensor([structure.layer_family(info).params_per_group(shapes) for info in eligible])
        order = scores.argsort(stable=True)[: len(structure.layers) - 1]
        layer_ids = torch.tensor([info.index for info in eligible], dtype=torch.long)
        pools.append(Pool("layer", None, scores[order], costs[order], layer_ids[order],
                          torch.arange(len(order) + 1, dtype=torch.long), len(order)))
    if not any(len(p) for p in pools):
        raise PrunerError(
            f"nothing can be removed in mode {cfg.mode!r} with the given layer ranges "
            f"(attention_layers={cfg.attention_layers}, mlp_layers={cfg.mlp_layers}, layers={cfg.layers})")
    return pools, records


def cheapest_first(pools: list[Pool], budget: int) -> list[torch.Tensor]:
    """Global: every unit of every pool by score per parameter (ties: lower layer first, then the
    order of the pools), taken until the budget is met as closely as possible. Returns a
    boolean "chosen" vector per pool."""
    scores = torch.cat([p.scores for p in pools])
    costs = torch.cat([p.costs for p in pools])
    # ties: the unit's layer (a layer unit's own index; -1 for hidden channels)
    layer = torch.cat([p.items if p.kind == "layer" else
                       torch.full((len(p),), -1 if p.layer is None else p.layer, dtype=torch.long) for p in pools])
    ratio = scores / costs.clamp_min(1).double()
    order = torch.argsort(layer, stable=True)
    order = order[torch.argsort(ratio[order], stable=True)]  # (ratio, layer), stable: pool order breaks ties
    total = costs[order].cumsum(0)  # removed after taking units 0..j
    before = total - costs[order]  # removed before unit j
    stop = (before >= budget) | (total - budget > budget - before)
    k = int(stop.nonzero()[0]) if bool(stop.any()) else len(order)
    chosen = torch.zeros(len(costs), dtype=torch.bool)
    chosen[order[:k]] = True
    return list(torch.split(chosen, [len(p) for p in pools]))


def _prefix(pools: list[Pool], counts: torch.Tensor) -> list[torch.Tensor]:
    return [torch.arange(len(p)) < int(n) for p, n in zip(pools, counts)]


def _local_counts(pools: list[Pool], ratios: torch.Tensor) -> torch.Tensor:
    """(len(ratios), n_pools) units each pool loses at each per-layer ratio (Python's round:
    half to even, as torch.round)."""
    full = torch.tensor([p.full_units for p in pools], dtype=torch.float64)
    sizes = torch.tensor([len(p) for p in pools], dtype=torch.long)
    return torch.minimum(torch.round(ratios.unsqueeze(1) * full).long(), sizes)


def select_units(pools: list[Pool], cfg: PruneConfig, total_params: int,
                 layer_params: int | None = None) -> list[torch.Tensor]:
    """A boolean "chosen" vector per pool. ``layer_params``: the decoder layers' parameters (the
    base of ``target_scope='layers'``)."""
    if cfg.target_sparsity is not None:
        layers = cfg.target_scope == "layers"
        if layers and layer_params is None:
            raise PrunerError("target_scope='layers' needs the decoder layers' parameter count (layer_params)")
        base = layer_params if layers else total_params
        budget = int(round(cfg.target_sparsity * base))
        available = int(sum(int(p.costs.sum()) for p in pools))
        if budget > available:
            of = "the decoder layers" if layers else "the model"
            raise PrunerError(
                f"target_sparsity={cfg.target_sparsity} asks to remove {budget:,} parameters but the chosen "
                f"mode and layer ranges allow at most {available:,} ({available / base:.1%} of {of}): "
                "widen attention_layers/mlp_layers, or lower the target")
        if cfg.global_ranking or cfg.mode == "layer":
            return cheapest_first(pools, budget)
        # local: the per-layer ratio (of 1/1000, 2/1000, ..., 1) whose removal lands closest to the budget
        ratios = torch.arange(1, 1001, dtype=torch.float64) / 1000
        counts = _local_counts(pools, ratios)  # (1000, n_pools)
        prefix = [torch.cat([torch.zeros(1, dtype=torch.long), p.costs.cumsum(0)]) for p in pools]
        removed = torch.stack([pre[counts[:, i]] for i, pre in enumerate(prefix)], dim=1).sum(1)  # (1000,)
        best = int((removed - budget).abs().argmin())  # the first of equally close ratios
        return _prefix(pools, counts[best])
    ratio = cfg.pruning_ratio
    if cfg.global_ranking:
        # the ratio of everything eligible, the unit each pool must keep included
        eligible = sum(int(p.costs.sum()) + (int(p.costs[-1]) if len(p) and p.kind != "layer" else 0) for p in pools)
        return cheapest_first(pools, int(round(ratio * eligible)))
    _check_whole_group_ratio(pools, ratio)
    return _prefix(pools, _local_counts(pools, torch.tensor([ratio], dtype=torch.float64))[0])


def _check_whole_group_ratio(pools: list[Pool], ratio: float) -> None:
    """With whole key/value groups a layer's attention can only lose k/n_kv of its heads; a
    ratio far from every such fraction would silently remove much more or nothing at all
    (the reference crashes on SmolLM2 at 0.25: 3 groups allow 0, 1/3, 2/3)."""
    for pool in pools:
        if pool.kind != "kv" or not len(pool):
            continue
        n = pool.full_units
        if abs(ratio * n - round(ratio * n)) > 0.15:
            nearest = max(1, round(ratio * n)) / n
            choices = ", ".join(f"{k / n:.3g}" for k in range(n))
            raise PrunerError(
                f"pruning_ratio={ratio} cannot be met by removing whole key/value groups: layer {pool.layer} "
                f"has {n} KV groups, so its attention can only lose {choices} of its heads; use "
                f"head_granularity='query' (removes query heads evenly inside every KV group) or "
                f"pruning_ratio={nearest:.4g}")


def _kept(n: int, removed: torch.Tensor) -> list[int]:
    mask = torch.ones(n, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().flatten().tolist()


def units_to_plan(pools: list[Pool], chosen: list[torch.Tensor], structure: ModelStructure) -> Plan:
    """The plan that removes the chosen units (each layer's kept sets built once)."""
    layers = [LayerPlan(info.index) for info in structure.layers]
    hidden_kept = None
    for pool, mask in zip(pools, chosen):
        if not bool(mask.any()):
            continue
        removed = pool.removed_items(mask)
        if pool.kind == "layer":
            for i in removed.tolist():
                layers[i].removed = True
        elif pool.kind == "hidden":
            hidden_kept = _kept(structure.hidden_size, removed)
        else:
            info, lp = structure.layers[pool.layer], layers[pool.layer]
            a = info.attention
            if pool.kind == "mlp":
                lp.mlp_channels_kept = _kept(info.mlp.num_channels, removed)
            elif pool.kind == "heads":
                lp.heads_kept = _kept(a.num_heads, removed)
                lp.kv_heads_kept = list(range(a.num_kv_heads))
            else:  # kv: whole groups with all their query heads
                lp.kv_heads_kept = _kept(a.num_kv_heads, removed)
                n_rep = a.num_heads // a.num_kv_heads
                kept = set(lp.kv_heads_kept)
                lp.heads_kept = [h for h in range(a.num_heads) if h // n_rep in kept]
    return Plan(layers, hidden_kept)


def mark_removed(records: list[dict], pools: list[Pool], chosen: list[torch.Tensor]) -> list[dict]:
    """The plan's group records: per family its scores (6 significant digits) and a removed flag
    per group, as plain lists."""
    gone: dict[tuple[str, int | None], torch.Tensor] = {}
    for pool, mask in zip(pools, chosen):
        removed = pool.removed_items(mask)
        if pool.kind == "layer":  # one record per layer
            for i in removed.tolist():
                gone[("layer", i)] = torch.zeros(1, dtype=torch.long)
            continue
        gone[(KINDS[pool.kind], pool.layer)] = removed
    out = []
    for r in records:
        flags = torch.zeros(len(r["scores"]), dtype=torch.bool)
        if (r["kind"], r["layer"]) in gone:
            flags[gone[(r["kind"], r["layer"])]] = True
        out.append({"kind": r["kind"], "layer": r["layer"], "scores": [float(f"{s:.6g}") for s in r["scores"].tolist()],
                    "removed": flags.tolist()})
    return out
