"""The end of a pruning fit: LoRA merged, the pruned model (under FSDP2 gathered on rank 0 into an
ordinary model) written by :func:`pruner.save_pretrained` with its plan, tokenizer and report.

Example:
    >>> export_tokenizer(None, owners=[object()]) is None  # no tokenizer anywhere: the export has none
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from pruner.distributed.gather import full_state_dict, materialize, skeleton_from
from pruner.io import load_tokenizer, save_pretrained
from pruner.recovery.lora import LoraSettings, attach_lora, has_lora, merge_lora
from pruner.structure import Plan


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


def gather_for_export(trainer: pl.Trainer, sharded: nn.Module, skeleton: tuple, lora: LoraSettings | None):
    """FSDP2: the trained shards gathered into an ordinary pruned model with LoRA merged, on rank 0
    only (the other ranks join the gathers and return None). ``skeleton``: the pruned model's
    (class, config, shapes); ``lora``: the attached adapters' settings (None without LoRA)."""
    state = full_state_dict(sharded, keep=trainer.is_global_zero)
    if not trainer.is_global_zero:
        return None
    model = skeleton_from(*skeleton)
    if lora is not None:
        attach_lora(model, lora)  # the same parameter names as the trained model
    model = materialize(model, state, sharded)
    if lora is not None:
        merge_lora(model)
    return model


def export_pruned(trainer: pl.Trainer, model: nn.Module | None, folder: Path, plan: Plan, *, tokenizer: Any,
                  overwrite: bool, report: str) -> None:
    """Rank 0 writes ``model`` (LoRA already merged) to ``folder``; every rank waits for it."""
    if trainer.is_global_zero:
        save_pretrained(model, folder, tokenizer=tokenizer, plan=plan, overwrite=overwrite,
                        extra_files={"report.md": report})
    trainer.strategy.barrier("pruner-export")


def merged_model(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged in place (on every rank: the modules stay identical)."""
    if has_lora(model):
        merge_lora(model)
    return model
