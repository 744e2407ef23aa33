"""The end of a pruning fit: LoRA merged, the pruned model written by :func:`pruner.save_pretrained`
with its plan, tokenizer and report. Under FSDP2 rank 0 writes it as it is gathered, one decoder
layer at a time (:func:`merged_weights`): no rank holds the whole model.

Example:
    >>> export_tokenizer(None, owners=[object()]) is None  # no tokenizer anywhere: the export has none
    True
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from pruner.distributed.gather import skeleton_from
from pruner.errors import PrunerError
from pruner.io import check_export_target, load_tokenizer, save_pretrained
from pruner.recovery.lora import LoraSettings, attach_lora, has_lora, merge_lora
from pruner.structure import Plan, find_layer_stack


def export_tokenizer(tokenizer: Any, owners: list[Any]):
    """The tokenizer to save: ``tokenizer`` (an object, or a name / folder to load it from), else
    the first ``owner.tokenizer`` (the module's, the datamodule's) that can be saved."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(str(tokenizer))
    if tokenizer is not None:
        return tokenizer
    for owner in owners:
        tok = getattr(owner, "tokenizer", None)
        if tok is not None and callable(getattr(tok, "save_pretrained", None)):
            return tok
    return None


def merged_weights(sharded: nn.Module, skeleton: tuple, lora: LoraSettings | None,
                   keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """FSDP2: the trained model's ``(name, full tensor)`` pairs with LoRA merged, gathered one unit
    at a time (a decoder layer, an adapted module outside them, or a single tensor) and merged
    there by peft as :func:`~pruner.recovery.lora.merge_lora` merges a whole model. Collective:
    every rank iterates to the end; only ``keep`` ranks get pairs. ``skeleton``: the pruned
    model's (class, config, shapes); ``lora``: the adapters' settings (None without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    described = skeleton_from(*skeleton)
    if lora is not None:
        attach_lora(described, lora)  # meta: the trained model's names, and where the adapters sit
    layers_path = find_layer_stack(described)[0]
    adapted = [n for n, m in described.named_modules() if isinstance(m, BaseTunerLayer)
               and not n.startswith(layers_path + ".")]

    def unit_of(name: str) -> str | None:
        if name.startswith(layers_path + "."):
            return ".".join(name.split(".")[: layers_path.count(".") + 2])  # e.g. model.layers.3
        return next((m for m in adapted if name.startswith(m + ".")), None)

    state = sharded.state_dict(keep_vars=True)
    names_of = Counter(id(t) for t in state.values())
    tied: dict[int, torch.Tensor] = {}  # a tensor under two names (tied embeddings): gathered once
    units: dict[str, list[str]] = {}
    for name in state:
        units.setdefault(unit_of(name) or name, []).append(name)
    for unit, names in units.items():
        full = {}
        for name in names:
            t = state[name]
            value = tied.get(id(t))
            if value is None:
                # a copy of its own: the merge below adds into it (a plain tensor would be the model's)
                value = t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach().clone()
                value = value.cpu() if keep else value
                if names_of[id(t)] > 1:
                    tied[id(t)] = value
            full[name] = value
        if not keep:
            continue
        if names == [unit]:  # a tensor of its own (embedding, final norm, output layer)
            yield unit, full[unit]
            continue
        yield from _merged_unit(described, unit, full)


def _merged_unit(described: nn.Module, unit: str, full: dict[str, torch.Tensor]):
    """One unit of :func:`merged_weights` materialized from its full tensors, its adapters merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = copy.deepcopy(described.get_submodule(unit))  # meta, with the adapters
    module.load_state_dict({n[len(unit) + 1:]: t for n, t in full.items()}, strict=True, assign=True)
    if isinstance(module, BaseTunerLayer):  # an adapted module outside the decoder layers
        module.merge()
        module = module.get_base_layer()
    elif has_lora(module):
        merge_lora(module)
    for name, t in module.state_dict().items():
        yield f"{unit}.{name}", t


def export_pruned(trainer: pl.Trainer, model: nn.Module | None, folder: Path, plan: Plan, *, tokenizer: Any,
                  overwrite: bool, report: str, weights: Iterator[tuple[str, torch.Tensor]] | None = None) -> None:
    """Rank 0 writes ``model`` (LoRA already merged) to ``folder``; every rank waits for it.
    ``weights`` (FSDP2): ``model`` only describes the architecture, the tensors come from this
    collective stream (:func:`merged_weights`), which every rank runs to its end."""
    problem = None
    if trainer.is_global_zero:
        try:  # refused before any rank gathers, so that no rank waits on a writer that gave up
            check_export_target(folder, overwrite)
        except PrunerError as e:
            problem = str(e)
    problem = trainer.strategy.broadcast(problem, src=0)
    if problem is not None:
        raise PrunerError(problem)
    if trainer.is_global_zero:
        save_pretrained(model, folder, tokenizer=tokenizer, plan=plan, overwrite=overwrite,
                        extra_files={"report.md": report}, weights=weights)
    elif weights is not None:
        for _ in weights:  # this rank's part of the gathers
            pass
    trainer.strategy.barrier("pruner-export")


def merged_model(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged in place (on every rank: the modules stay identical)."""
    if has_lora(model):
        merge_lora(model)
    return model
