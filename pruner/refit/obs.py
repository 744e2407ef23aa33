"""Optimal Brain Surgeon choice of WHICH MLP channels and heads a layer loses (ZipLM / SlimGPT
style), from the refit's input statistics: the channels whose removal the least-squares refit
can best make up for.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    >>> h_inv = torch.linalg.inv(x.T @ x / 200 + 0.1 * torch.eye(8, dtype=torch.float64))
    >>> greedy_obs(h_inv, torch.randn(4, 8, generator=g, dtype=torch.float64), 3).sum().item()
    5
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import PrunerError
from ..structure import ModelStructure, Plan, consumer_columns, sync_group_records
from .statistics import GramCollector


@torch.no_grad()
def greedy_obs_eager(h_inv: torch.Tensor, w: torch.Tensor, n_remove: int) -> torch.Tensor:
    """The reference for :func:`greedy_obs`: the same greedy choices with ``W`` and ``H⁻¹``
    downdated in full at every step (O(n²) per step; what ``greedy_obs`` replaced, kept for the
    tests and ``benchmarks/prune_cost.py``). Consumes both matrices; returns the kept mask.

    Example:
        >>> h_inv, w = torch.eye(3, dtype=torch.float64), torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
        >>> greedy_obs_eager(h_inv, w, 1).tolist()
        [False, True, True]
    """
    alive = torch.ones(len(h_inv), dtype=torch.bool)
    for _ in range(n_remove):
        cost = w.square().sum(0) / h_inv.diagonal()
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        d = h_inv[j, j]
        w.addr_(w[:, j].clone(), h_inv[j, :], alpha=-1 / d)
        h_inv.addr_(h_inv[:, j].clone(), h_inv[j, :].clone(), alpha=-1 / d)
        alive[j] = False
    return alive


@torch.no_grad()
def greedy_obs(h_inv: torch.Tensor, w: torch.Tensor, n_remove: int, block: int = 64) -> torch.Tensor:
    """Greedy Optimal Brain Surgeon over the columns of ``w`` (out, n) with ``h_inv`` = H⁻¹
    (n, n), both fp64 and consumed: ``n_remove`` times, the column of least cost
    ``‖W[:, j]‖² / [H⁻¹]_jj`` goes and ``W``, ``H⁻¹`` take the optimal rank-one downdate.
    Returns the boolean mask of the columns that stay.

    The downdates are lazy (as in SparseGPT's blocks): the last ``block`` rank-one updates are
    kept as factors ``H⁻¹ - U Uᵀ`` and ``W - V Uᵀ``, from which the one column each step needs
    is computed, while the diagonal of H⁻¹ and the column norms of W follow by their rank-one
    recurrences; every ``block`` steps the factors are folded in by matrix products. The same
    choices as the eager downdate of both matrices at every step, several times faster.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 8, generator=g, dtype=torch.float64)
        >>> h_inv = torch.linalg.inv(x.T @ x / 200 + 0.1 * torch.eye(8, dtype=torch.float64))
        >>> greedy_obs(h_inv, torch.randn(4, 8, generator=g, dtype=torch.float64), 3).sum().item()
        5
    """
    n = h_inv.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    diag = h_inv.diagonal().clone()  # (n,) of the current H⁻¹
    norms = w.square().sum(0)  # (n,) squared column norms of the current W
    us = torch.empty(n, block, dtype=h_inv.dtype)  # current H⁻¹ = h_inv - U Uᵀ
    vs = torch.empty(w.shape[0], block, dtype=w.dtype)  # current W = w - V Uᵀ
    k = 0
    for _ in range(n_remove):
        cost = norms / diag
        cost[~alive] = float("inf")
        q = int(cost.argmin())
        u_blk, v_blk = us[:, :k], vs[:, :k]
        h = h_inv[:, q] - u_blk @ u_blk[q]  # (n,) column q of the current H⁻¹
        scale = h[q].sqrt()
        u = h / scale
        v = (w[:, q] - v_blk @ u_blk[q]) / scale  # (out,) column q of the current W, scaled
        c = v @ w - (v @ v_blk) @ u_blk.T  # (n,) vᵀ (current W)
        norms += u * (u * (v @ v) - 2 * c)  # ‖W_j - v u_j‖²
        diag -= u * u
        alive[q] = False
        us[:, k], vs[:, k] = u, v
        k += 1
        if k == block:  # fold the factors in: matrix products instead of rank-one updates
            h_inv.addmm_(us, us.T, alpha=-1)  # in place: no (n, n) temporary
            w.addmm_(vs, us.T, alpha=-1)
            k = 0
    return alive


def _obs_start(model: nn.Module, collector: GramCollector, name: str, damping: float,
               cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H⁻¹, W)`` of consumer ``name`` in fp64, both restricted to ``cols`` (in that order) if
    given: ``H = G + μI``, ``G`` its mean input Gram matrix, ``μ = damping · mean(diag G)``."""
    if name not in collector.grams:
        raise PrunerError(f"no input statistics for {name}: run the reconstruction batches with the "
                          "GramCollector attached before choosing by OBS")
    summed, tokens = collector.grams[name], max(collector.tokens[name], 1)  # (in, in)
    w = model.get_submodule(name).weight.detach().double()  # (out, in)
    if cols is not None:
        gram, w = summed[cols.unsqueeze(1), cols], w[:, cols]
        gram /= tokens  # in place: the mean Gram is one in² copy
    else:
        gram = summed / tokens  # the mean Gram: one in² copy, then H in place (no identity, no sum)
    mu = damping * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(mu)  # H = G + μI: the identity's zeros change nothing off the diagonal
    # H is symmetric positive definite (μ > 0): its Cholesky factor, then H⁻¹ from it, each copy
    # freed as the next is made (two in² matrices at a time beside the Gram sum; LU's inverse
    # holds four, and takes twice as long)
    factor = torch.linalg.cholesky(gram)  # (n, n) lower
    del gram
    h_inv = torch.cholesky_inverse(factor)
    del factor
    return h_inv, w.clone()


@torch.no_grad()
def select_mlp_obs(plan: Plan, structure: ModelStructure, model: nn.Module, collector: GramCollector,
                   damping: float = 0.1, fisher_weighted: bool = False, layer: int | None = None) -> Plan:
    """Re-chooses WHICH MLP channels each layer loses; how many stays as ``plan`` says.

    Greedy Optimal Brain Surgeon on the consumer's (down_proj's) input statistics, as in ZipLM /
    SlimGPT: with ``H = G + μI`` (``G`` the Gram matrix of :class:`GramCollector`, ``μ`` =
    ``damping`` times the mean of G's diagonal), removing input column ``j`` and refitting the others optimally changes
    the output by ``‖W[:, j]‖² / [H⁻¹]_jj`` (in the ``H`` norm). The cheapest channel goes, then
    ``W`` and ``H⁻¹`` are downdated (rank one, lazily: :func:`greedy_obs`) and the next one is
    chosen, until the layer has lost as many channels as the plan says. Unlike an importance score, this accounts for the
    refit that :func:`compensate` computes afterwards. Returns a new plan (group records updated).

    ``fisher_weighted`` (``mlp_selection="obs-fisher"``): the output error is measured in the
    loss's metric instead, each output ``o`` of the consumer weighted by ``F_o``, the mean squared
    gradient of the text's loss with respect to it (``collector.fisher``, a diagonal Fisher): the
    cost of a channel becomes ``Σ_o F_o W[o, j]² / [H⁻¹]_jj``, so errors in the directions the
    rest of the model is sensitive to count more. The refit is the same for every row weighting
    (each output row is fitted on its own); only which channels go changes. ``layer``: re-choose in
    that layer alone (the layer-sequential refit), None = every layer.
    """
    new = copy.deepcopy(plan)
    for lp in new.layers:
        if lp.removed or lp.mlp_channels_kept is None or (layer is not None and lp.index != layer):
            continue
        info = structure.layers[lp.index]
        weight_name, cols = consumer_columns(info, "mlp")  # cols: (n_channels, k)
        name = weight_name.removesuffix(".weight")
        if cols.shape[1] != 1:
            raise PrunerError(f"{name}: OBS selection needs one consumer column per MLP channel, got "
                              f"{cols.shape[1]}; use mlp_selection='score'")
        n_remove = info.mlp.num_channels - len(lp.mlp_channels_kept)
        h_inv, w = _obs_start(model, collector, name, damping, cols[:, 0])  # (n, n), (out, n): channel order
        if fisher_weighted:
            w *= output_weights(collector, name).sqrt()[:, None]  # rows of W in the loss's metric
        alive = greedy_obs(h_inv, w, n_remove)
        lp.mlp_channels_kept = alive.nonzero().flatten().tolist()
    sync_group_records(new)
    return new


def output_weights(collector: GramCollector, name: str) -> torch.Tensor:
    """The mean squared loss gradient per output of consumer ``name`` (fp64, (out,))."""
    if name not in collector.fisher or not collector.fisher_tokens.get(name):
        raise PrunerError(f"no output Fisher statistics for {name}: mlp_selection='obs-fisher' needs backward passes "
                          "of the refit text (pruner.refit.statistics.collect_output_fisher) before choosing")
    return collector.fisher[name] / collector.fisher_tokens[name]


@torch.no_grad()
def select_heads_obs(plan: Plan, structure: ModelStructure, model: nn.Module, collector: GramCollector,
                     damping: float = 0.1, layer: int | None = None) -> Plan:
    """Re-chooses WHICH query heads (or KV groups) each layer loses; how many stays as ``plan`` says.

    Block Optimal Brain Surgeon on the consumer's (o_proj's) input statistics: removing the
    columns ``C`` of a head and refitting the others optimally changes the output by
    ``tr(W_C ([H⁻¹]_CC)⁻¹ W_Cᵀ)``; the cheapest head goes, ``W`` and ``H⁻¹`` are downdated
    (rank ``|C|``) and the next is chosen. With query-head granularity every KV group loses as
    many heads as in ``plan`` (GQA stays uniform); when ``plan`` removes whole KV groups, a
    unit is one group with all its query heads. Returns a new plan (group records updated).
    ``layer``: re-choose in that layer alone, None = every layer.
    """
    new = copy.deepcopy(plan)
    for lp in new.layers:
        if lp.removed or lp.heads_kept is None or (layer is not None and lp.index != layer):
            continue
        info = structure.layers[lp.index]
        a = info.attention
        n_rep = a.num_heads // a.num_kv_heads
        weight_name, cols = consumer_columns(info, "heads")  # cols: (n_heads, head_dim)
        name = weight_name.removesuffix(".weight")
        kv_kept = lp.kv_heads_kept if lp.kv_heads_kept is not None else list(range(a.num_kv_heads))
        if len(kv_kept) < a.num_kv_heads:  # whole KV groups go: a unit is a group's query heads
            units = [list(range(g * n_rep, (g + 1) * n_rep)) for g in range(a.num_kv_heads)]
            group_of = [0] * len(units)
            quota = [a.num_kv_heads - len(kv_kept)]
        else:  # query heads, the same number from every KV group
            units = [[h] for h in range(a.num_heads)]
            group_of = [h // n_rep for h in range(a.num_heads)]
            quota = [n_rep - sum(1 for h in lp.heads_kept if h // n_rep == g) for g in range(a.num_kv_heads)]
        h_inv, w = _obs_start(model, collector, name, damping)  # (in, in), (out, in)
        alive = set(range(len(units)))
        while any(quota):
            best = None
            for u in sorted(alive):
                if quota[group_of[u]] == 0:
                    continue
                c = cols[units[u]].reshape(-1)  # the unit's o_proj columns
                block = torch.linalg.inv(h_inv[c][:, c])  # (|C|, |C|)
                cost = float(((w[:, c] @ block) * w[:, c]).sum())
                if best is None or cost < best[0]:
                    best = (cost, u, c, block)
            _, u, c, block = best
            w -= w[:, c] @ block @ h_inv[c, :]  # the optimal update of the other columns
            h_inv -= h_inv[:, c] @ block @ h_inv[c, :]
            alive.discard(u)
            quota[group_of[u]] -= 1
        gone = {h for u in range(len(units)) if u not in alive for h in units[u]}
        lp.heads_kept = [h for h in range(a.num_heads) if h not in gone]
        if len(kv_kept) < a.num_kv_heads:
            lp.kv_heads_kept = sorted(alive)
    sync_group_records(new)
    return new
