"""What the pruned model recovers with, set up by ``StructuralPruneCallback``: LoRA drawn from the
seed, and the dense model kept as a distillation teacher (a copy, or under FSDP2 its own shards).

Example:
    >>> import lightning as L
    >>> wants_dense_teacher(L.LightningModule())  # a module without the teacher hooks
    False
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import torch
from torch import nn

from pruner.recovery.lora import LoraSettings, attach_lora


def wants_dense_teacher(pl_module: pl.LightningModule) -> bool:
    """Distillation: the module wants a teacher, has none yet, and keeps a copy of the dense model."""
    return (getattr(pl_module, "wants_teacher", False) and callable(getattr(pl_module, "keep_teacher", None))
            and getattr(pl_module, "teacher", None) is None)


def keep_teacher(pl_module: pl.LightningModule, dense: nn.Module) -> None:
    """Distillation: a module that wants a teacher keeps the dense model, frozen, before surgery."""
    if wants_dense_teacher(pl_module):
        pl_module.keep_teacher(dense)


def attach_seeded_lora(model: nn.Module, settings: LoraSettings, seed: int) -> None:
    """LoRA in place, its weights drawn from ``seed``: the same on every rank and world size,
    whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_lora(model, settings)


def teacher_in_place(pl_module: pl.LightningModule, dense: nn.Module) -> bool:
    """FSDP2 distillation: whether the module can keep the dense model's own shards as its teacher
    (``keep_teacher(model, copy=False)``, in the model's dtype), so no rank holds a dense copy."""
    keep = getattr(pl_module, "keep_teacher", None)
    if not callable(keep) or "copy" not in inspect.signature(keep).parameters:
        return False
    dtype = getattr(pl_module, "teacher_dtype", None)
    return dtype is None or dtype == next(dense.parameters()).dtype
