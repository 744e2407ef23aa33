"""The whole-model refit the layer walk replaced, kept as the reference it must equal: every
pruned layer's Gram matrices (and dense outputs) from one pass over the dense model, OBS and the
least-squares refit for all layers at once, the surgery, then the regional fit over the pruned
model (pruner <= 0.1's prune_steps, one step)."""

from __future__ import annotations

import torch

from pruner.batches import as_batch
from pruner.config import PruneConfig
from pruner.loop import choose_within, estimate_importance, make_plan
from pruner.refit import GramCollector, collect_inputs, collect_output_fisher, compensate, consumers, regional_fit
from pruner.refit.regional import target_modules
from pruner.structure import Transaction, apply_plan, count_parameters, discover


def reference_prune(model, batches: list[torch.Tensor], cfg: PruneConfig, text: list[torch.Tensor] | None = None):
    """Prunes ``model`` in place the way pruner.prune did before the layer walk; returns the plan."""
    structure = discover(model, seed=cfg.seed)
    outputs = target_modules(structure, cfg) if cfg.regional_epochs else None
    collector = GramCollector(model, consumers(structure, cfg), outputs)
    vectors = estimate_importance(model, batches, structure, cfg, collector=collector if text is None else None)
    if text is not None:
        collect_inputs(model, text, collector)
    if cfg.mlp_selection == "obs-fisher":
        collect_output_fisher(model, text if text is not None else batches, collector, cfg.fisher_samples)
    plan = make_plan(structure, vectors, cfg, count_parameters(model))
    plan = choose_within(plan, structure, model, cfg, collector)
    refit = compensate(plan, structure, model, collector, cfg.reconstruct_damping)
    tx = Transaction()
    apply_plan(plan, model, structure, refit=refit, transaction=tx)
    if cfg.regional_epochs:
        device = next(model.parameters()).device
        fit_batches = [as_batch(b, device) for b in (text if text is not None else batches)]
        plan.calibration["regional"] = regional_fit(model, structure, cfg, fit_batches, collector.outputs, tx)
    tx.commit()
    return plan
