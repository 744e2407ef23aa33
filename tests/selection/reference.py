"""The per-unit selection of pruner 0.1 (one Python object per unit), kept as the reference the
vectorised ``pruner.selection`` must reproduce plan for plan (tests/test_selection.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.importance import family_scores
from pruner.structure import LayerPlan, ModelStructure, Plan


@dataclass
class Unit:
    score: float
    cost: int  # parameters removed
    kind: str  # "heads" | "kv" | "mlp" | "hidden" | "layer"
    layer: int | None
    items: list[int]  # head / group / channel / layer indices removed by this unit


def in_range(r: tuple[int, int] | None, i: int) -> bool:
    """Whether layer ``i`` lies in the half-open range ``r`` (None = every layer)."""
    return r is None or r[0] <= i < r[1]


def _ordered_units(scores: torch.Tensor, kind: str, layer: int | None, unit_size: int, cost_each: int,
                   max_units: int) -> list[Unit]:
    """Groups sorted by score, packed into units of ``unit_size`` (the first absorbs any remainder)."""
    order = scores.argsort(stable=True).tolist()  # stable: deterministic ties
    n = len(order)
    first = n % unit_size or unit_size
    bounds = [0, first] + list(range(first + unit_size, n + 1, unit_size))
    units = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if len(units) >= max_units:
            break
        items = order[lo:hi]
        units.append(Unit(float(scores[items].sum()), cost_each * len(items), kind, layer, items))
    return units


def _query_head_units(head_scores: torch.Tensor, n_kv: int, cost_per_head: int, layer: int,
                      max_units: int) -> list[Unit]:
    """Unit k removes the k-th least important query head of every KV group (uniform GQA)."""
    n_rep = len(head_scores) // n_kv
    per_group = head_scores.view(n_kv, n_rep)  # (n_kv, n_rep)
    order = per_group.argsort(dim=1, stable=True)  # (n_kv, n_rep)
    units = []
    for k in range(min(n_rep - 1, max_units)):
        items = [g * n_rep + int(order[g, k]) for g in range(n_kv)]
        units.append(Unit(float(head_scores[items].sum()), cost_per_head * n_kv, "heads", layer, items))
    return units


def candidate_units(structure: ModelStructure, vectors, cfg: PruneConfig) -> tuple[list[list[Unit]], list[dict]]:
    """Units per *pool* (each pool is removed lowest-first) and every group's score for the plan."""
    shapes = structure.shapes
    pools: list[list[Unit]] = []
    records: list[dict] = []
    cap = lambda n: max(int(n * cfg.max_layer_ratio), 0) if cfg.global_ranking else n  # noqa: E731

    def record(kind, layer, scores):
        records.extend({"kind": kind, "layer": layer, "index": i, "score": float(f"{s:.6g}")}
                       for i, s in enumerate(scores.tolist()))

    if cfg.mode == "block":
        for info in structure.layers:
            a, m = info.attention, info.mlp
            if a is not None and cfg.prunes("attention", info.index):
                n_rep = a.num_heads // a.num_kv_heads
                if cfg.head_granularity == "query" and n_rep > 1:
                    s = family_scores(a.heads, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                    record("attention_head", info.index, s)
                    pools.append(_query_head_units(s, a.num_kv_heads, a.heads.params_per_group(shapes), info.index,
                                                   cap(n_rep - 1)))
                else:
                    s = family_scores(a.kv_groups, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                    record("kv_group", info.index, s)
                    pools.append(_ordered_units(s, "kv", info.index, 1, a.kv_groups.params_per_group(shapes),
                                                cap(a.num_kv_heads - 1)))
            if m is not None and cfg.prunes("mlp", info.index):
                s = family_scores(m.channels, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
                record("mlp_channel", info.index, s)
                step = cfg.rounding(m.num_channels)
                n_units = (m.num_channels - 1) // step  # keep at least one unit
                pools.append(_ordered_units(s, "mlp", info.index, step, m.channels.params_per_group(shapes),
                                            cap(n_units)))
    elif cfg.mode == "channel":
        fam = structure.hidden_family()
        s = family_scores(fam, vectors, cfg.criterion, cfg.aggregation, cfg.seed)
        record("hidden_channel", None, s)
        step = cfg.rounding(structure.hidden_size)
        pools.append(_ordered_units(s, "hidden", None, step, fam.params_per_group(shapes),
                                    (structure.hidden_size - 1) // step))
    else:
        eligible = [info for info in structure.layers if in_range(cfg.layers, info.index)]
        scores = torch.stack([
            family_scores(structure.layer_family(info), vectors, cfg.criterion, cfg.aggregation, cfg.seed)[0]
            for info in eligible
        ])
        for info, sc in zip(eligible, scores.tolist()):
            records.append({"kind": "layer", "layer": info.index, "index": info.index, "score": float(f"{sc:.6g}")})
        costs = [structure.layer_family(info).params_per_group(shapes) for info in eligible]
        order = scores.argsort(stable=True).tolist()
        max_remove = len(structure.layers) - 1
        pools.append([Unit(float(scores[i]), costs[i], "layer", eligible[i].index, [eligible[i].index])
                      for i in order[:max_remove]])
    if not any(pools):
        raise PrunerError(
            f"nothing can be removed in mode {cfg.mode!r} with the given layer ranges "
            f"(attention_layers={cfg.attention_layers}, mlp_layers={cfg.mlp_layers}, layers={cfg.layers})")
    return pools, records


def _cheapest_first(units: list[Unit], budget: int) -> list[Unit]:
    """Greedy by score per parameter until the budget is met as closely as possible."""
    chosen, removed = [], 0
    for u in sorted(units, key=lambda u: (u.score / max(u.cost, 1), u.layer if u.layer is not None else -1)):
        if removed >= budget:
            break
        # take the unit if that lands closer to the budget than stopping here
        if removed + u.cost - budget <= budget - removed:
            chosen.append(u)
            removed += u.cost
        else:
            break
    return chosen


def _local(pools: list[list[Unit]], ratio: float) -> list[Unit]:
    chosen = []
    for pool in pools:
        n = min(int(round(ratio * _full_units(pool))), len(pool))
        chosen.extend(pool[:n])
    return chosen


def _full_units(pool: list[Unit]) -> int:
    """How many units the ratio applies to: all groups of the pool (the last kept one included)."""
    if not pool:
        return 0
    kind = pool[0].kind
    return len(pool) if kind == "layer" else len(pool) + 1


def select_units(pools: list[list[Unit]], cfg: PruneConfig, total_params: int) -> list[Unit]:
    all_units = [u for pool in pools for u in pool]
    if cfg.target_sparsity is not None:
        budget = int(round(cfg.target_sparsity * total_params))
        available = sum(u.cost for u in all_units)
        if budget > available:
            raise PrunerError(
                f"target_sparsity={cfg.target_sparsity} asks to remove {budget:,} parameters but the chosen "
                f"mode and layer ranges allow at most {available:,} ({available / total_params:.1%} of the model): "
                "widen attention_layers/mlp_layers, or lower the target")
        if cfg.global_ranking or cfg.mode == "layer":
            return _cheapest_first(all_units, budget)
        # local: the per-layer ratio whose removal lands closest to the budget
        best, best_gap = [], None
        for step in range(1, 1001):
            chosen = _local(pools, step / 1000)
            gap = abs(sum(u.cost for u in chosen) - budget)
            if best_gap is None or gap < best_gap:
                best, best_gap = chosen, gap
        return best
    ratio = cfg.pruning_ratio
    if cfg.global_ranking:
        # the ratio of everything eligible, the unit each pool must keep included
        eligible = sum(sum(u.cost for u in p) + (p[-1].cost if p and p[0].kind != "layer" else 0) for p in pools)
        budget = int(round(ratio * eligible))
        return _cheapest_first(all_units, budget)
    _check_whole_group_ratio(pools, ratio)
    return _local(pools, ratio)


def _check_whole_group_ratio(pools: list[list[Unit]], ratio: float) -> None:
    """With whole key/value groups a layer's attention can only lose k/n_kv of its heads; a
    ratio far from every such fraction would silently remove much more or nothing at all
    (the reference crashes on SmolLM2 at 0.25: 3 groups allow 0, 1/3, 2/3)."""
    for pool in pools:
        if not pool or pool[0].kind != "kv":
            continue
        n = _full_units(pool)
        if abs(ratio * n - round(ratio * n)) > 0.15:
            nearest = max(1, round(ratio * n)) / n
            choices = ", ".join(f"{k / n:.3g}" for k in range(n))
            raise PrunerError(
                f"pruning_ratio={ratio} cannot be met by removing whole key/value groups: layer {pool[0].layer} "
                f"has {n} KV groups, so its attention can only lose {choices} of its heads; use "
                f"head_granularity='query' (removes query heads evenly inside every KV group) or "
                f"pruning_ratio={nearest:.4g}")


def units_to_plan(units: list[Unit], structure: ModelStructure) -> Plan:
    layers = []
    by_layer: dict[int | None, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    hidden_kept = None
    for u in by_layer.get(None, []):
        hidden_kept = hidden_kept if hidden_kept is not None else set(range(structure.hidden_size))
        hidden_kept -= set(u.items)
    for info in structure.layers:
        lp = LayerPlan(info.index)
        for u in by_layer.get(info.index, []):
            a = info.attention
            if u.kind == "layer":
                lp.removed = True
            elif u.kind == "mlp":
                kept = set(lp.mlp_channels_kept if lp.mlp_channels_kept is not None else range(info.mlp.num_channels))
                lp.mlp_channels_kept = sorted(kept - set(u.items))
            elif u.kind == "heads":
                kept = set(lp.heads_kept if lp.heads_kept is not None else range(a.num_heads))
                lp.heads_kept = sorted(kept - set(u.items))
                lp.kv_heads_kept = list(range(a.num_kv_heads))
            elif u.kind == "kv":
                kept = set(lp.kv_heads_kept if lp.kv_heads_kept is not None else range(a.num_kv_heads))
                lp.kv_heads_kept = sorted(kept - set(u.items))
                n_rep = a.num_heads // a.num_kv_heads
                lp.heads_kept = [h for h in range(a.num_heads) if h // n_rep in lp.kv_heads_kept]
        layers.append(lp)
    return Plan(layers, sorted(hidden_kept) if hidden_kept is not None else None)
