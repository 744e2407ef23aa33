"""Resuming a pruning fit: the callback state's settings checked against the callback's, the
pruned (+ LoRA) structure rebuilt on the freshly built dense model before Lightning loads the
weights, and :func:`load_pruned_checkpoint` for a module without a Trainer.

A checkpoint is read through :func:`pruner.io.read_checkpoint` (tensors and plain data only):
nothing in the file runs as it loads.

Example:
    >>> settings = {"criterion": "element1"}
    >>> check_resumable({"version": STATE_VERSION, "settings": {"criterion": "l1"}}, settings)
    Traceback (most recent call last):
    ...
    pruner.errors.PrunerError: the checkpoint was written with other pruning settings (criterion: checkpoint 'l1', callback 'element1'): resume with the same StructuralPruneCallback settings, or start a new fit without ckpt_path
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from pruner.errors import PrunerError
from pruner.io import find_causal_lm, read_checkpoint
from pruner.recovery.lora import LoraSettings, attach_lora, has_lora
from pruner.distributed.gather import build_skeleton, discovery_copy, meta_copy, unsharded_copy
from pruner.distributed.sliced import parameters_made_by
from pruner.structure import ModelStructure, Plan, apply_plan, discover

from .distributed import install_sharded, rebuild_training
from .recovery import attach_seeded_lora, keep_teacher, teacher_in_place, wants_dense_teacher

STATE_VERSION = 2  # callback state layout in checkpoints (1: pruner <= 0.1.0 before this file)


def check_resumable(state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuses a state of another layout version or written with other pruning ``settings``."""
    if state.get("version") != STATE_VERSION:
        raise PrunerError(f"the checkpoint's StructuralPruneCallback state has version {state.get('version')!r}, "
                          f"this pruner writes {STATE_VERSION}: resume with the pruner version that wrote it, or "
                          "start the fit again")
    theirs, ours = json.loads(json.dumps(state.get("settings", {}))), settings
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        listed = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, callback {ours.get(k)!r}" for k in differ)
        raise PrunerError(f"the checkpoint was written with other pruning settings ({listed}): resume with the "
                          "same StructuralPruneCallback settings, or start a new fit without ckpt_path")


def install_resume_hook(pl_module: pl.LightningModule, state_key: str,
                        on_state: Callable[[dict[str, Any]], None]) -> None:
    """Lightning loads the module's weights before any callback state, so the pruned structure
    must exist by then: the module's ``on_load_checkpoint`` (called just before the weights
    load) is wrapped, for this fit only, to call ``on_state`` with the callback's state first."""
    remove_resume_hook(pl_module)
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        state = (checkpoint.get("callbacks") or {}).get(state_key)
        if state is not None:
            on_state(state)
        original(checkpoint)

    on_load_checkpoint.pruner_resume_hook = True
    pl_module.on_load_checkpoint = on_load_checkpoint


def remove_resume_hook(pl_module: pl.LightningModule, strategy=None) -> None:
    hook = vars(pl_module).get("on_load_checkpoint")
    if getattr(hook, "pruner_resume_hook", False):
        del pl_module.on_load_checkpoint
    if strategy is not None and getattr(vars(strategy).get("load_checkpoint"), "pruner_resume_hook", False):
        del strategy.load_checkpoint


def install_sharded_resume_hook(strategy, state_key: str, on_state: Callable[[dict[str, Any]], None]) -> None:
    """FSDP2 (``ModelParallelStrategy``) loads the weights and optimizer states inside
    ``strategy.load_checkpoint``, before any hook, into the model and optimizers as they are then:
    it is wrapped, for this fit only, to read the callback's state from the checkpoint first
    (:func:`callback_state_at`) and call ``on_state`` with it (the pruned structure and its
    optimizers must exist by then)."""
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path, *args, **kwargs):
        state = callback_state_at(checkpoint_path, state_key)
        if state is not None:
            on_state(state)
        return original(checkpoint_path, *args, **kwargs)

    load_checkpoint.pruner_resume_hook = True
    strategy.load_checkpoint = load_checkpoint


def callback_state_at(path, state_key: str) -> dict[str, Any] | None:
    """The callback state ``state_key`` in the checkpoint at ``path``: a Lightning file, or a
    sharded checkpoint's folder (its ``meta.pt``, where Lightning keeps all but the tensors).
    Read as tensors and plain data only; the file's tensors are mapped, not read. None where
    there is none (Lightning then reports what it finds)."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
    if not path.is_file():
        return None
    return (read_checkpoint(path, mmap=True).get("callbacks") or {}).get(state_key)


def checkpointed_model(pl_module: nn.Module, state: dict[str, Any]) -> nn.Module:
    """The causal LM a callback state's plan applies to, inside ``pl_module``."""
    path = state.get("model_path")
    if path is None:
        return find_causal_lm(pl_module)[1]
    return pl_module.get_submodule(path) if path else pl_module


def rebuild_structure(pl_module: nn.Module, state: dict[str, Any], lora: LoraSettings | None = None) -> None:
    """Applies a callback state's plan (and LoRA) to the dense causal LM inside ``pl_module``."""
    if not state.get("pruned"):
        return
    model = checkpointed_model(pl_module, state)
    apply_plan(Plan.from_dict(state["plan"]), model, check_fingerprint=False)
    if state.get("lora") and not has_lora(model):
        settings = lora or LoraSettings(**{**state["settings"]["lora"],
                                           "target_modules": tuple(state["settings"]["lora"]["target_modules"])})
        attach_lora(model, settings)


def load_pruned_checkpoint(pl_module: pl.LightningModule, checkpoint: str | Path | dict) -> pl.LightningModule:
    """Loads a checkpoint of a pruning fit into a freshly built (dense) ``pl_module`` without a
    Trainer: the pruned (+ LoRA) structure is rebuilt from the callback state, then the weights
    load. Returns ``pl_module``. ``checkpoint``: a ``.ckpt`` path, read as tensors and plain data
    only (:func:`pruner.io.read_checkpoint`: nothing in the file runs), or a dict already loaded.

    Example:
        >>> module = load_pruned_checkpoint(MyFinetune(), "checkpoints/last.ckpt")  # doctest: +SKIP
    """
    source = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint dict"
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    states = [s for k, s in (checkpoint.get("callbacks") or {}).items() if k.startswith("StructuralPruneCallback")]
    if not states:
        raise PrunerError(f"{source} holds no StructuralPruneCallback state: it was not written by a pruning "
                          "fit; load it with the module's own load_from_checkpoint")
    pl_module.configure_model()  # modules that build their model there (Lightning calls it in fit too)
    rebuild_structure(pl_module, states[0])
    pl_module.on_load_checkpoint(checkpoint)
    pl_module.load_state_dict(checkpoint["state_dict"])
    return pl_module


def rebuild_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any], lora: LoraSettings,
                    seed: int, structure: ModelStructure | None = None) -> tuple:
    """FSDP2: a pruned state's structure in place of the freshly built, sharded dense model, and new
    optimizers for its parameters, before the strategy loads the checkpoint's weights and optimizer
    states into them. Planned on the meta device, LoRA drawn beside it, sharded and filled from the
    dense shards as at the prune step (no rank holds the whole model; the load then overwrites
    the values). A distilling module keeps the dense shards as teacher where it can (else a copy,
    as at the prune step). ``structure``: the dense model's, where the fit start discovered it
    already (None: discovered here). Collective. Returns the pruned model's skeleton (for the export)."""
    dense = checkpointed_model(pl_module, state)
    plan = Plan.from_dict(state["plan"])
    structure = discover(discovery_copy(dense)) if structure is None else structure
    shared_teacher = wants_dense_teacher(pl_module) and teacher_in_place(pl_module, dense)
    if wants_dense_teacher(pl_module) and not shared_teacher:
        keep_teacher(pl_module, unsharded_copy(dense))  # (a module whose teacher is a copy: said at the prune step)
    model = meta_copy(dense)
    apply_plan(plan, model, structure, check_fingerprint=False)
    skeleton = build_skeleton(model)
    values = parameters_made_by(model, lambda m: attach_seeded_lora(m, lora, seed)) if state.get("lora") else None
    path = state.get("model_path")
    path = find_causal_lm(pl_module)[0] if path is None else path
    install_sharded(trainer, pl_module, path, model, dense, (plan, structure, values))
    if shared_teacher:
        pl_module.keep_teacher(dense, copy=False)
    rebuild_training(trainer)
    return skeleton
