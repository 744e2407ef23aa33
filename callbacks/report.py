"""``report.md`` of a pruning fit: parameters before/after, validation perplexity at the three
moments the callback measures it (:func:`measure_perplexity`), and the settings that shaped the result.

Example:
    >>> from pruner.structure import LayerPlan, Plan
    >>> plan = Plan([LayerPlan(0)], params={"before": 100, "after": 80, "removed": 20, "removed_fraction": 0.2},
    ...             settings={"criterion": "element1"}, pruner_version="0.1.0")
    >>> print(pruning_report(plan, {"dense": 10.0}, recovery_steps=5).splitlines()[8])
    | removed | 20 (20.00%) |
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from pruner.eval.perplexity import loader_perplexity
from pruner.structure import Plan

REPORT_SETTINGS = ("criterion", "aggregation", "mode", "target_sparsity", "target_scope", "pruning_ratio",
                   "global_ranking", "head_granularity", "prune_attention", "prune_mlp", "attention_selection", "mlp_selection",
                   "round_to", "reconstruct", "reconstruct_damping", "regional_epochs",
                   "regional_lr")  # the plan settings the report lists
LABELS = {"dense": "dense (before pruning)", "pruned": "pruned, before recovery", "recovered": "after recovery"}


PROTOCOL_LABELS = {"paper": "no BOS in any window, as the LLM-Pruner paper",
                   "bos": "each window after the tokenizer's BOS token"}


def pruning_report(plan: Plan, perplexity: dict[str, float], recovery_steps: int, protocol: str | None = None) -> str:
    """The report's Markdown text. ``perplexity``: ``{"dense"|"pruned"|"recovered": value}``
    (empty when there was no validation data); ``protocol``: the validation windows' protocol
    (``pruner.data.windows``), None when the datamodule does not say."""
    p = plan.params
    lines = ["# Pruning report", "", f"Written by StructuralPruneCallback (pruner {plan.pruner_version}).", "",
             "| | parameters |", "|---|---|", f"| before | {p['before']:,} |", f"| after | {p['after']:,} |",
             f"| removed | {p['removed']:,} ({p['removed_fraction']:.2%}) |"]
    if "removed_layer_fraction" in p:  # plans written before 0.2.x lack it
        lines.append(f"| removed from the decoder layers | {p['layers_before'] - p['layers_after']:,} "
                     f"({p['removed_layer_fraction']:.2%} of {p['layers_before']:,}) |")
    lines.append("")
    if perplexity:
        lines += ["| validation perplexity | |", "|---|---|"]
        for key, value in perplexity.items():
            label = LABELS[key] + (f" ({recovery_steps} steps)" if key == "recovered" else "")
            lines.append(f"| {label} | {value:.3f} |")
        lines += ["", f"Validation windows: protocol {protocol!r} ({PROTOCOL_LABELS[protocol]})."
                  if protocol in PROTOCOL_LABELS else "Validation windows: as the datamodule made them.", ""]
    else:
        lines += ["No validation data (data.val_source): perplexity not measured.", ""]
    s = plan.settings
    shown = {**s, "round_to": "auto" if s.get("round_to", 1) is None else s.get("round_to")}  # None: 32 for wide layers
    calibration = {k: v for k, v in plan.calibration.items() if k != "regional"}
    lines += ["Settings: " + ", ".join(f"{k}={shown[k]}" for k in REPORT_SETTINGS if k in s),
              f"Calibration: {calibration}"]
    fit = plan.calibration.get("regional")
    if fit and fit.get("layers"):
        before, after = (sum(fit[k]) / len(fit[k]) for k in ("error_before", "error_after"))
        lines.append(f"Regional fit: the MLPs of {len(fit['layers'])} layers ({fit['layers'][0]}..{fit['layers'][-1]}), "
                     f"mean relative error to the dense layer outputs {before:.4f} -> {after:.4f}, "
                     f"{fit['seconds']:.0f} s (per layer: plan.json)")
    lines += ["", "The exact plan is in plan.json."]
    return "\n".join(lines) + "\n"


def window_protocol(trainer: pl.Trainer) -> str | None:
    """The window protocol of the datamodule's validation windows (``PruneDataModule.protocol``),
    or None where the datamodule does not say."""
    protocol = getattr(trainer.datamodule, "protocol", None)
    return protocol if isinstance(protocol, str) else None


def measure_perplexity(trainer: pl.Trainer, model: nn.Module, device: torch.device, when: str) -> float | None:
    """Validation perplexity of ``model`` now (every rank computes the same), on the datamodule's
    validation batches when they are dicts holding ``input_ids``; None where there are none.
    Under FSDP2 ``model`` is the root of the sharding, whose hooks gather its weights."""
    dm = trainer.datamodule
    if dm is None or not callable(getattr(dm, "val_dataloader", None)):
        return None
    if isinstance(dm, pl.LightningDataModule) and not is_overridden("val_dataloader", dm):
        return None  # the base class's raises MisconfigurationException: a datamodule without validation
    loader = dm.val_dataloader()
    if not loader:
        return None
    first = next(iter(loader), None)
    if not isinstance(first, dict) or not torch.is_tensor(first.get("input_ids")):
        if when == "dense":
            rank_zero_info("StructuralPruneCallback: the validation batches are not dicts holding 'input_ids': "
                           "no perplexity report (report_perplexity: false silences this)")
        return None
    return loader_perplexity(model, loader, device)
