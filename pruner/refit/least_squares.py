"""Least-squares compensation of the consumers of removed channels (optional, no training).

When MLP channels or attention heads go, the layer's output loses their contribution
``W_R x_R``. From the calibration inputs of each consumer (down_proj, o_proj) we keep the Gram
matrix ``G = E[x xᵀ]`` and refit the kept columns so that they reproduce the dense output as
well as possible, pulled towards the original columns where the calibration data says nothing:
``W'_K = (W G[:, K] + μ W_K) (G[K, K] + μ I)⁻¹`` with ``μ = damping · mean(diag G[K, K])``
(ridge regression towards ``W_K``: with 640 calibration tokens and 1000 kept channels most
directions are unobserved, and a ridge towards zero would erase them). Removed columns are then sliced away as usual. The cost is one Gram matrix per
consumer (in_features², fp64) accumulated during the calibration forward passes.

Example:
    >>> import torch
    >>> from pruner.testing import tiny_causal_lm
    >>> from pruner.structure import discover
    >>> from pruner.refit.statistics import GramCollector, collect_inputs
    >>> from pruner.structure.plan import LayerPlan, Plan
    >>> model = tiny_causal_lm("llama")
    >>> structure = discover(model)
    >>> collector = GramCollector(model, ["model.layers.0.mlp.down_proj"])
    >>> collect_inputs(model, [torch.randint(3, 120, (4, 32))], collector)
    >>> plan = Plan([LayerPlan(0, mlp_channels_kept=list(range(48))), LayerPlan(1), LayerPlan(2)])
    >>> compensate(plan, structure, model, collector)["model.layers.0.mlp.down_proj.weight"].shape
    torch.Size([64, 48])
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunerError
from ..structure import ModelStructure, Plan, removed_slices
from .statistics import GramCollector


@torch.no_grad()
def compensate(plan: Plan, structure: ModelStructure, model: nn.Module, collector: GramCollector,
               damping: float = 0.1) -> dict[str, torch.Tensor]:
    """The refit of every consumer that loses input columns under ``plan``: ``{weight name:
    W'_K (out, |K|)}``, the pruned weight to use instead of the sliced one. Nothing in ``model``
    changes here; pass the result to ``pruner.apply_plan(plan, model, refit=...)``, which puts
    it in place as part of the (all-or-nothing) surgery."""
    removed = removed_slices(plan, structure)
    refit = {}
    for name in collector.names:
        key = (f"{name}.weight", 1)
        gone = removed.get(key)
        if not gone or name not in collector.grams:
            continue
        linear = model.get_submodule(name)
        n_in = linear.in_features
        kept = torch.tensor([i for i in range(n_in) if i not in gone])
        # the mean Gram's blocks taken from the sum, element by element as (G / t)[...] would be,
        # without a copy of the whole in² matrix (at 8192 inputs: 512 MB each in fp64)
        gram, tokens = collector.grams[name], max(collector.tokens[name], 1)  # (in, in) summed
        g_kk = gram[kept.unsqueeze(1), kept] / tokens  # (|K|, |K|)
        ridge = damping * g_kk.diagonal().mean().clamp_min(1e-12)
        w = linear.weight.double()  # (out, in)
        columns = gram[:, kept]  # (in, |K|)
        columns /= tokens  # in place: one copy of the columns, not two
        rhs = w @ columns + ridge * w[:, kept]  # (out, |K|)
        del columns
        system = g_kk
        system.diagonal().add_(ridge)  # + ridge·I, in place: adding the identity's zeros changes nothing
        new = torch.linalg.solve(system, rhs.T).T  # W'_K (out, |K|); the system is symmetric
        if not torch.isfinite(new).all():
            raise PrunerError(f"the least-squares refit of {name} is not finite (NaN/inf input statistics?): "
                              "check the reconstruction text, or raise reconstruct_damping")
        refit[f"{name}.weight"] = new.to(linear.weight.dtype)
    return refit
