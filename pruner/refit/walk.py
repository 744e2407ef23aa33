"""The refit one decoder layer at a time (as SparseGPT and FLAP do), so that memory holds one
layer's statistics, not every layer's.

The refit's text is run up to the first layer the refit touches; from there, layer by layer:

1. the layer runs on the *dense* stream with hooks on its consumers (o_proj, down_proj): their
   input Gram matrices (summed over ranks) and the dense layer's output;
2. OBS re-chooses which heads / MLP channels the layer loses (how many, the plan says), the
   consumers' kept columns are refit by least squares, and the layer alone is pruned;
3. with ``regional_epochs``, the layer's MLP is fit on the *pruned* stream towards the dense
   output (:func:`pruner.refit.regional.fit_layer`), which carries the pruned stream on;
4. the layer's statistics are freed and the dense stream is its dense output.

Every quantity is the one the whole-model pass computed (Grams from the dense stream, the
regional fit on the pruned stream towards the dense one), so plans and weights are the same;
what is held at once is one layer's Gram matrices (in_features² fp64 each) and the two streams
(tokens x hidden, in the model's dtype), instead of every pruned layer's Gram matrices and dense
outputs. Every weight change joins the caller's transaction.

Example:
    >>> import torch
    >>> import pruner
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> text = [torch.randint(3, 120, (4, 24)) for _ in range(2)]
    >>> plan = pruner.prune(model, text, pruning_ratio=0.5, reconstruct=True, mlp_selection="obs")
    >>> model.model.layers[0].mlp.down_proj.in_features
    48
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import PrunerError
from ..structure import ModelStructure, Plan, Transaction, apply_layer, record_sizes, sync_group_records
from .least_squares import compensate
from .obs import select_heads_obs, select_mlp_obs
from .regional import AllReduce, MlpBranch, capture_layer_inputs, fit_layer, fitted_layers, token_mask
from .statistics import GramCollector, consumers

Reduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # sums every tensor over ranks
Check = Callable[[Plan, ModelStructure], None]


class Window(Protocol):
    """A copy of a sharded model whose decoder layers are gathered one at a time
    (:class:`pruner.distributed.window.LayerWindow`)."""

    model: nn.Module

    def hold(self, index: int) -> None: ...  # gather layer ``index`` and keep it

    def done(self, index: int, changed: bool) -> None: ...  # keep its new weights (if changed), drop it

    def holding(self, index: int) -> AbstractContextManager: ...  # the layer gathered for a while

    def close(self) -> nn.Module: ...  # every weight dropped; the pruned model's meta skeleton


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _changes(plan: Plan, index: int) -> bool:
    lp = plan.layers[index]
    return lp.heads_kept is not None or lp.kv_heads_kept is not None or lp.mlp_channels_kept is not None


@torch.no_grad()
def refit_layer_by_layer(model: nn.Module, structure: ModelStructure, plan: Plan, cfg: PruneConfig,
                         text: list[dict], fisher: GramCollector | None, transaction: Transaction, *,
                         reduce: Reduce | None = None, all_reduce: AllReduce | None = None,
                         check: Check | None = None, fit_text: list[dict] | None = None,
                         window: Window | None = None, branch: MlpBranch | None = None) -> tuple[Plan, dict | None]:
    """Prunes ``model`` by ``plan`` one layer at a time, each layer's removals re-chosen by OBS
    (``attention_selection`` / ``mlp_selection`` = ``"obs"``/``"obs-fisher"``) and its consumers
    refit, then, with ``regional_epochs``, its MLP fit (module docstring). ``text``: the refit's
    batches (dicts on the model's device; this rank's). ``fisher``: obs-fisher's output statistics
    (the whole model's backward passes, before the walk). ``reduce`` sums each layer's statistics
    over ranks, ``all_reduce`` the regional fit's gradients; ``check`` sees the plan before each
    layer's weights change. ``fit_text``: the same tokens in other batches for the regional fit's
    stream (None: ``text``'s). ``window``: ``model`` is a :class:`Window`'s copy of a sharded model,
    each layer gathered while the walk is on it and handed back after (the dense model is the
    undo: nothing of the copy is kept for a rollback). ``branch``: what the layers add to the stream
    from their MLP's output (:func:`pruner.refit.regional.mlp_branch`; None: that output). Returns
    the plan as re-chosen and the regional report (None without)."""
    if not text:
        raise PrunerError("reconstruct=True refits on the inputs of the pruned layers, but there is no text: pass "
                          "reconstruction_batches (or calibration batches)")
    touched = [i for i in range(len(plan.layers)) if _changes(plan, i)]
    fitted = fitted_layers(structure, cfg) if cfg.regional_epochs else []
    report = {"layers": [], "error_before": [], "error_after": [], "epochs": cfg.regional_epochs,
              "lr": cfg.regional_lr, "seconds": 0.0} if cfg.regional_epochs else None
    walked = sorted(set(touched) | set(fitted))
    plan = Plan.from_dict(plan.to_dict())  # the caller's plan stays as it was
    if not walked:
        return plan, report
    was_training = model.training
    model.eval()  # no dropout in the layers' outputs (a Lightning fit may have left train mode on)
    seconds = 0.0
    try:
        first = model.get_submodule(structure.layers[walked[0]].path)
        dense = capture_layer_inputs(model, first, text)
        fit_text = fit_text if fit_text is not None and cfg.regional_epochs else text
        # the same stream until a layer is pruned (or fitted), unless the fit batches the tokens otherwise
        pruned = dense if fit_text is text else capture_layer_inputs(model, first, fit_text)
        keep = token_mask(fit_text, dense[0][0].device)
        for index in range(walked[0], walked[-1] + 1):
            info = structure.layers[index]
            layer = model.get_submodule(info.path)
            if window is not None:
                window.hold(index)
            if index in touched:
                dense_out, plan = _prune_layer(model, structure, plan, cfg, index, dense, fisher, transaction,
                                               reduce, check)
            else:
                dense_out = [(_first(layer(h, **kw)), kw) for h, kw in dense]
            if index in fitted:
                start = time.time()
                with torch.enable_grad():
                    pruned = fit_layer(model, structure, cfg, index, pruned, [h for h, _ in dense_out], keep,
                                       transaction, all_reduce, report, branch)
                seconds += time.time() - start
            elif pruned is not dense:
                pruned = [(_first(layer(h, **kw)), kw) for h, kw in pruned]
            else:
                pruned = dense_out  # untouched so far: one stream
            dense = dense_out
            if window is not None:
                window.done(index, changed=index in touched or index in fitted)
                transaction.commit()
            else:  # what the undo of this layer needs goes to files: in memory it would grow layer by layer
                transaction.spill()
        record_sizes(plan, model, structure, transaction)
    finally:
        model.train(was_training)
    sync_group_records(plan)
    if report is not None:
        total = torch.tensor([seconds, 1.0], dtype=torch.float64)
        total = all_reduce(total) if all_reduce is not None else total
        report["seconds"] = round(float(total[0] / total[1]), 1)  # the mean over ranks: one report on every rank
    return plan, report


def _prune_layer(model: nn.Module, structure: ModelStructure, plan: Plan, cfg: PruneConfig, index: int,
                 dense: list[tuple[torch.Tensor, dict]], fisher: GramCollector | None, transaction: Transaction,
                 reduce: Reduce | None, check: Check | None):
    """Layer ``index``: its statistics on the dense stream, OBS, refit, surgery. Returns the dense
    layer's output (per batch) and the plan with this layer's removals as chosen."""
    info = structure.layers[index]
    layer = model.get_submodule(info.path)
    names = [n for n in consumers(structure, cfg) if n.startswith(info.path + ".")]
    collector = GramCollector(model, names)
    collector.attach()
    try:
        dense_out = [(_first(layer(h, **kw)), kw) for h, kw in dense]
    finally:
        collector.detach()
    if reduce is not None:
        collector = reduced_statistics(collector, model, reduce)
    if fisher is not None:
        collector.fisher = {n: fisher.fisher[n] for n in names if n in fisher.fisher}
        collector.fisher_tokens = {n: fisher.fisher_tokens[n] for n in names if n in fisher.fisher_tokens}
    damping = cfg.reconstruct_damping
    if cfg.attention_selection == "obs":
        plan = select_heads_obs(plan, structure, model, collector, damping, layer=index)
    if cfg.mlp_selection in ("obs", "obs-fisher"):
        plan = select_mlp_obs(plan, structure, model, collector, damping,
                              fisher_weighted=cfg.mlp_selection == "obs-fisher", layer=index)
    if check is not None:
        check(plan, structure)
    refit = compensate(plan, structure, model, collector, damping)
    apply_layer(plan, model, structure, index, refit, transaction)
    return dense_out, plan


def reduced_statistics(local: GramCollector, model: nn.Module, reduce: Reduce) -> GramCollector:
    """``local``'s Gram matrices and output Fisher summed over ranks (fp64), as a collector for
    ``model`` (the module the refit changes)."""
    names = [n for n in local.names if n in local.grams or n in local.fisher]
    grams = [n for n in names if n in local.grams]
    fisher = [n for n in names if n in local.fisher]
    out = GramCollector(model, local.names, local.output_modules)
    out.outputs = local.outputs
    if not names:
        return out

    def count(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(n), dtype=torch.float64, device=like.device)

    tensors = {f"g::{n}": local.grams[n] for n in grams}
    tensors.update({f"t::{n}": count(local.tokens[n], local.grams[n]) for n in grams})
    tensors.update({f"f::{n}": local.fisher[n] for n in fisher})
    tensors.update({f"ft::{n}": count(local.fisher_tokens[n], local.fisher[n]) for n in fisher})
    summed = reduce(tensors)
    device = next(model.parameters()).device
    out.grams = {n: summed[f"g::{n}"].to(device) for n in grams}
    out.tokens = {n: int(summed[f"t::{n}"]) for n in grams}
    out.fisher = {n: summed[f"f::{n}"].to(device) for n in fisher}
    out.fisher_tokens = {n: int(summed[f"ft::{n}"]) for n in fisher}
    return out
