"""Measured choice of WHICH attention heads / key-value groups a layer loses.

The selector decides how many heads or KV groups each layer gives up from the importance
scores; this step then re-decides which ones by measuring the calibration loss with them
masked, layer by layer, in the context of the rest of the plan (every other removal already
masked). First-order Taylor scores are a poor guide for removing a third of a layer's
attention at once (a whole KV group of SmolLM2); what the measured choice gains:
docs/results.md.

Masking a head = zeroing its columns in the attention output projection (its only consumer),
which is exactly what removing it computes; a KV group is masked with all its query heads.
Cost: forward passes only, over the calibration batches: per layer, one per candidate set
(C(n_kv, k) for whole KV groups, at most ``max_combinations``; otherwise one per head).

Example:
    >>> plan = refine_attention(model, structure, plan, batches)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from ..structure import LayerInfo, LayerPlan, ModelStructure, Plan, consumer_columns, sync_group_records


class _Masker:
    """Zeroes consumer columns and remembers their values, so that every change is undone."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.saved: dict[tuple[str, int], torch.Tensor] = {}

    def set(self, name: str, columns: torch.Tensor, masked: bool) -> None:
        w = self.params[name].data
        for c in columns.reshape(-1).tolist():
            key = (name, c)
            if masked and key not in self.saved:
                self.saved[key] = w[:, c].clone()
                w[:, c] = 0
            elif not masked and key in self.saved:
                w[:, c] = self.saved.pop(key)

    def restore(self) -> None:
        for (name, c), col in self.saved.items():
            self.params[name].data[:, c] = col
        self.saved.clear()


def _removed_heads(lp: LayerPlan, n_heads: int) -> set[int]:
    return set(range(n_heads)) - set(lp.heads_kept) if lp.heads_kept is not None else set()


@torch.no_grad()
def refine_attention(model: nn.Module, structure: ModelStructure, plan: Plan, batches: list[dict],
                     all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     max_combinations: int = 64) -> Plan:
    """Returns a copy of ``plan`` whose attention removals are chosen by measured calibration
    loss (same number of heads / KV groups per layer). ``batches``: dicts with ``input_ids``
    (and optionally ``attention_mask`` / ``labels``) on the model's device. ``all_reduce``
    sums a tensor over ranks (DDP) so that every rank measures the same loss and decides alike.
    The model's weights are unchanged on return."""
    new = Plan.from_dict(plan.to_dict())
    targets = [(info, lp) for info, lp in zip(structure.layers, new.layers)
               if info.attention is not None and not lp.removed and _removed_heads(lp, info.attention.num_heads)]
    if not targets or not batches:
        return new
    was_training = model.training
    model.eval()
    masker = _Masker(model)

    def loss() -> float:
        total = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            labels = b.get("labels", b["input_ids"])
            out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
        if all_reduce is not None:
            total = all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    try:
        # context: everything the plan removes (heads and MLP channels) is masked
        for info, lp in zip(structure.layers, new.layers):
            if lp.removed:
                continue
            if info.attention is not None:
                name, cols = consumer_columns(info, "heads")
                for h in _removed_heads(lp, info.attention.num_heads):
                    masker.set(name, cols[h], True)
            if info.mlp is not None and lp.mlp_channels_kept is not None:
                name, cols = consumer_columns(info, "mlp")
                gone = sorted(set(range(info.mlp.num_channels)) - set(lp.mlp_channels_kept))
                masker.set(name, cols[gone], True)
        for info, lp in targets:
            _refine_layer(info, lp, masker, loss, max_combinations)
    finally:
        masker.restore()
        model.train(was_training)
    sync_group_records(new)
    return new


def _refine_layer(info: LayerInfo, lp: LayerPlan, masker: _Masker, loss: Callable[[], float],
                  max_combinations: int) -> None:
    a = info.attention
    name, cols = consumer_columns(info, "heads")
    n_rep = a.num_heads // a.num_kv_heads
    removed = _removed_heads(lp, a.num_heads)
    members = [list(range(g * n_rep, (g + 1) * n_rep)) for g in range(a.num_kv_heads)]  # query heads per group
    whole_groups = [g for g in range(a.num_kv_heads) if set(members[g]) <= removed]

    def measure(heads: set[int]) -> float:
        for h in range(a.num_heads):
            masker.set(name, cols[h], h in heads)
        return loss()

    if whole_groups and len(whole_groups) * n_rep == len(removed):  # whole KV groups go
        k = len(whole_groups)
        combos = list(itertools.combinations(range(a.num_kv_heads), k))
        if len(combos) <= max_combinations:
            best = min(combos, key=lambda c: measure({h for g in c for h in members[g]}))
        else:  # too many sets: rank groups one at a time
            single = {g: measure(set(members[g])) for g in range(a.num_kv_heads)}
            best = tuple(sorted(single, key=single.get)[:k])
        chosen = {h for g in best for h in members[g]}
        lp.kv_heads_kept = [g for g in range(a.num_kv_heads) if g not in best]
    else:  # query heads, the same number inside every KV group
        per_group = {g: len(set(members[g]) & removed) for g in range(a.num_kv_heads)}
        single = {h: measure({h}) for h in range(a.num_heads)}
        chosen = set()
        for g in range(a.num_kv_heads):
            chosen |= set(sorted(members[g], key=single.get)[: per_group[g]])
    lp.heads_kept = [h for h in range(a.num_heads) if h not in chosen]
    for h in range(a.num_heads):  # leave this layer masked as decided for the next layers
        masker.set(name, cols[h], h in chosen)
