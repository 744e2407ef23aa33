"""What ``StructuralPruneCallback`` checks before any work could be lost: its options when built,
the trainer at ``setup``, the model when fit starts, the loaders when training starts, and each
step's plan before its weights change. Every refusal names the problem and the fix.

Example:
    >>> check_options(calibration_batches=0)
    Traceback (most recent call last):
    ...
    pruner.errors.PrunerError: `StructuralPruneCallback(calibration_batches=0)` must be an integer >= 1 or None to take the datamodule's calibration_batches
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from pruner.checks import existing_ancestor
from pruner.config import PruneConfig
from pruner.distributed import is_fsdp_module
from pruner.errors import PrunerError
from pruner.io import check_export_target
from pruner.loop import calibration_reruns
from pruner.precision import warn_if_bf16_is_emulated
from pruner.recovery.lora import has_lora, missing_targets

from .distributed import check_ranks_agree


def check_options(calibration_batches: int | None = None, prune_at_step: int | None = None,
                  model_attribute: str | None = None, export_dir: Any = None, tokenizer: Any = None,
                  **flags: bool) -> None:
    """The callback's own options (the pruning options are :class:`~pruner.config.PruneConfig`'s)."""
    for name, value in (("calibration_batches", calibration_batches), ("prune_at_step", prune_at_step)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            fix = ("or None to take the datamodule's calibration_batches" if name == "calibration_batches"
                   else "(train batches before pruning), or None to prune right after the calibration batches")
            raise PrunerError(f"`StructuralPruneCallback({name}={value!r})` must be an integer >= 1 {fix}")
    if calibration_batches is not None and prune_at_step is not None and prune_at_step < calibration_batches:
        raise PrunerError(
            f"`StructuralPruneCallback(prune_at_step={prune_at_step})` comes before the "
            f"{calibration_batches} calibration batches end: use prune_at_step >= calibration_batches"
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise PrunerError(f"`StructuralPruneCallback({name}={value!r})` must be true or false")
    if model_attribute is not None and (not isinstance(model_attribute, str) or not model_attribute.strip()):
        raise PrunerError(f"`StructuralPruneCallback(model_attribute={model_attribute!r})` must be a dotted "
                          "attribute path such as 'model' or 'backbone.lm', or None to find the model")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)) and not callable(
            getattr(tokenizer, "save_pretrained", None)):
        raise PrunerError(f"`StructuralPruneCallback(tokenizer={tokenizer!r})` must be a tokenizer (with "
                          "save_pretrained), a model name or folder to load it from, or None")
    if export_dir is not None and (not isinstance(export_dir, (str, Path)) or not str(export_dir).strip()):
        raise PrunerError(f"`StructuralPruneCallback(export_dir={export_dir!r})` must be a folder path, or None")


def check_strategy(trainer: pl.Trainer, cfg: PruneConfig) -> bool:
    """The strategy and precision can carry importance gradients; returns whether the model is
    sharded by FSDP2 (``ModelParallelStrategy``)."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    mine = [c for c in trainer.callbacks if type(c).__name__ == "StructuralPruneCallback"]
    if len(mine) > 1:
        raise PrunerError(f"trainer.callbacks holds {len(mine)} StructuralPruneCallbacks: one fit prunes once; keep "
                          "one (prune again in a second fit on the exported model)")
    strategy = trainer.strategy
    sharded = isinstance(strategy, ModelParallelStrategy)
    if sharded:
        check_sharded_config(cfg)
    elif not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise PrunerError(
            f"StructuralPruneCallback supports the single-device, DDP and ModelParallelStrategy (FSDP2) "
            f"strategies, not {type(strategy).__name__}: use strategy: auto (one device), ddp or "
            "ModelParallelStrategy"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise PrunerError(
            f"trainer precision {trainer.precision_plugin.precision!r} scales the loss with a GradScaler, "
            "which would corrupt the importance gradients: use precision bf16-mixed or 32-true"
        )
    if str(trainer.precision).startswith("bf16") and trainer.is_global_zero:
        warn_if_bf16_is_emulated(strategy.root_device, f"trainer precision {trainer.precision!r}",
                                 "use precision 32-true (null) here, bf16 where the hardware has it")
    return sharded


def check_sharded_config(cfg: PruneConfig) -> None:
    """What gradient shards averaged over ranks cannot give, refused before the fit."""
    if cfg.criterion in ("element2", "mix"):
        raise PrunerError(
            f"criterion {cfg.criterion!r} needs per-sample gradients, but under ModelParallelStrategy "
            "(FSDP2) gradients are averaged over ranks before any rank sees them: use criterion element1 "
            "(the paper's default) or vector, or strategy: ddp"
        )
    what = calibration_reruns(cfg, gathered_only=True)
    if what is not None:
        raise PrunerError(
            f"{what} is not supported under ModelParallelStrategy (FSDP2): it would run forward/backward "
            "passes on the gathered, unsharded model on every rank; use attention_selection: score (or obs) "
            "and iterative_steps: 1, or strategy: ddp"
        )


def resolve_calibration_batches(trainer: pl.Trainer, calibration_batches: int | None,
                                prune_at_step: int | None) -> int:
    """The number of calibration batches: the option, else the datamodule's ``calibration_batches``."""
    n = calibration_batches
    if n is None:
        dm = trainer.datamodule
        n = getattr(dm, "calibration_batches", None) if dm is not None else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PrunerError(
                "StructuralPruneCallback(calibration_batches=None) takes the count from the datamodule, but "
                f"{type(dm).__name__ if dm is not None else 'there is no datamodule and it'} has no "
                "`calibration_batches`: pass calibration_batches=N (the first N train batches calibrate; the "
                "paper uses 10 samples) or use pruner.lightning_modules.data.PruneDataModule"
            )
    if prune_at_step is not None and prune_at_step < n:
        raise PrunerError(
            f"`StructuralPruneCallback(prune_at_step={prune_at_step})` comes before the {n} calibration "
            f"batches end: use prune_at_step >= {n}"
        )
    return n


def check_datamodule(trainer: pl.Trainer, cfg: PruneConfig) -> None:
    """The datamodule's refit text and the pruning options agree."""
    dm_hparams = getattr(trainer.datamodule, "hparams", None) or {}
    if dm_hparams.get("reconstruction_source") and not cfg.reconstruct:
        raise PrunerError(
            f"the datamodule has reconstruction_source={dm_hparams['reconstruction_source']!r}, text for the "
            "least-squares refit, but StructuralPruneCallback(reconstruct=False) would not use it: set "
            "reconstruct: true, or data.reconstruction_source: null"
        )
    if cfg.regional_epochs and not callable(getattr(trainer.datamodule, "reconstruction_batches", None)):
        raise PrunerError(
            "StructuralPruneCallback(regional_epochs=...) fits the pruned MLPs on the refit's text, which comes "
            "from the datamodule's reconstruction_batches() (input_ids batches): give the datamodule that method "
            "(PruneDataModule: data.reconstruction_source), or set regional_epochs: 0"
        )


def check_export_folder(trainer: pl.Trainer, export_dir: str | None, overwrite: bool) -> None:
    """The export folder can be written (rank 0): refused before the fit, not after recovery."""
    if export_dir is not None and trainer.is_global_zero:
        check_export_target(export_dir, overwrite)


def check_model(trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, *, model_path: str,
                sharded: bool, lora_targets: tuple[str, ...] | None, prune_at: int, export_dir: str | None) -> None:
    """The causal LM can be pruned here: no adapters yet, FSDP2 applied to the model rather than
    the module, LoRA targets that exist (``lora_targets``, None without LoRA), a fit long enough
    to reach the prune step, room for the export."""
    from peft import PeftModel

    if has_lora(model) or any(isinstance(m, PeftModel) for m in pl_module.modules()):
        raise PrunerError(
            f"{type(model).__name__} already has LoRA/peft adapters before pruning: prune the dense model "
            "(with CausalLMModule, set model.attach_lora_at_start: false); StructuralPruneCallback attaches "
            "LoRA itself after pruning (attach_lora: true)"
        )
    if sharded and is_fsdp_module(pl_module):
        raise PrunerError(
            f"fully_shard was applied to the LightningModule {type(pl_module).__name__} itself: shard the "
            f"causal LM instead (each decoder layer, then the model at {model_path!r}), which "
            "StructuralPruneCallback can gather, prune and shard again"
        )
    if sharded and (laid_out := tensor_parallel_parameter(model)) is not None:
        name, placements = laid_out
        raise PrunerError(
            f"{name} is laid out as {placements}: tensor parallelism is not supported by StructuralPruneCallback, "
            "which prunes weights sharded along their first dimension only; shard the model with fully_shard "
            "(FSDP2, or HSDP on a 2-D mesh) and no parallelize_module"
        )
    if lora_targets is not None and (gone := missing_targets(model, lora_targets)):
        raise PrunerError(
            f"LoRA target(s) {gone} match no linear layer of {type(model).__name__}: set lora_target_modules "
            "to names of its projections (e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj]), or attach_lora: false"
        )
    check_fit_reaches_prune_step(trainer, prune_at)
    if export_dir is not None and trainer.is_global_zero:
        check_export_space(export_dir, model)


def tensor_parallel_parameter(model: nn.Module) -> tuple[str, str] | None:
    """The first parameter (name, placements) laid out otherwise than FSDP2 / HSDP lay out weights
    (replicated, or sharded along dim 0), None when there is none."""
    for name, p in model.named_parameters():
        placements = getattr(p, "placements", None)
        if placements is not None and any(not (pl.is_replicate() or pl.is_shard(0)) for pl in placements):
            return name, str(tuple(placements))
    return None


def check_fit_reaches_prune_step(trainer: pl.Trainer, prune_at: int) -> None:
    """``max_steps`` (Lightning counts the calibration batches as steps) and ``max_epochs`` leave
    room for the prune step: refused now, naming the numbers, rather than a fit that never prunes.
    A fit that writes checkpoints may stop short on purpose (a job in time-limited parts): it is
    resumed with ``ckpt_path``, and its end says so."""
    accumulate = trainer.accumulate_grad_batches
    if trainer.max_steps != -1 and trainer.max_steps * accumulate < prune_at and trainer.checkpoint_callback is None:
        need = -(-prune_at // accumulate)
        raise PrunerError(
            f"trainer.max_steps={trainer.max_steps} ends the fit after {trainer.max_steps * accumulate} train batches, "
            f"before the prune step after batch {prune_at} (Lightning counts calibration batches as steps"
            f"{f', {accumulate} batches a step' if accumulate > 1 else ''}) and no checkpoint lets a later fit go on: "
            f"set max_steps to at least {need} plus the recovery steps, lower calibration_batches / prune_at_step, or "
            "write checkpoints (ModelCheckpoint) to resume from")
    if trainer.max_epochs == 0:
        raise PrunerError("trainer.max_epochs=0 runs no train batch, so the model would never be pruned: use "
                          "max_epochs >= 1")


def check_epoch_reached_prune_step(batches_seen: int, prune_at: int, stopped: bool = False,
                                   resumable: bool = False) -> None:
    """After the first epoch: it held the prune step (every calibration batch must be in it);
    ``stopped``: something else ended the fit (max_steps, early stopping, max_time,
    ``should_stop``); ``resumable``: it writes checkpoints (the end of fit says what to do)."""
    if batches_seen < prune_at and stopped and resumable:
        return
    if batches_seen < prune_at and stopped:
        raise PrunerError(
            f"fit stopped before the prune step after batch {prune_at} (after {batches_seen} train batches: max_time, "
            "early stopping or should_stop ended it): the model was not pruned and nothing was exported; let the "
            "fit run past the prune step")
    if batches_seen < prune_at:
        raise PrunerError(
            f"the first epoch ended after {batches_seen} train batches, before the prune step after batch {prune_at}: "
            "the model was not pruned (the train loader, an IterableDataset without a length say, yields fewer "
            "batches per epoch); give it at least that many batches, or lower calibration_batches / prune_at_step")


def check_resumable_loader(trainer: pl.Trainer, recorded: int) -> None:
    """Resuming in the middle of calibration: the train loader must continue where it stopped,
    or the batches already recorded would be recorded again (Lightning restarts a loader without
    ``state_dict``/``load_state_dict`` from its first batch)."""
    loaders = trainer.train_dataloader
    loaders = list(loaders.values()) if isinstance(loaders, dict) else \
        list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    restarts = [type(d).__name__ for d in loaders
                if not (callable(getattr(d, "state_dict", None)) and callable(getattr(d, "load_state_dict", None)))]
    if restarts:
        raise PrunerError(
            f"this fit resumes in the middle of calibration ({recorded} batches recorded), but its train loader "
            f"({restarts[0]}) has no state_dict/load_state_dict, so it restarts from its first batch and calibration "
            "would count those batches twice: give the loader that interface (PruneDataModule's has it, so does "
            "torchdata's StatefulDataLoader), resume from a checkpoint written after the prune step, or start the "
            "fit again")


def check_export_space(export_dir: str, model: nn.Module) -> None:
    """The export needs at most the dense model's bytes: refuse now rather than after recovery."""
    existing = existing_ancestor(export_dir)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise PrunerError(f"the export needs up to {need / 2**20:,.0f} MiB but {existing} has {free / 2**20:,.0f} "
                          "MiB free: free some space or choose another export_dir")


def check_loader_length(trainer: pl.Trainer, prune_at: int) -> None:
    """The loaders exist from ``on_train_start`` on: refuse a first epoch that ends before the
    prune step, rather than a fit that silently never prunes."""
    total = trainer.num_training_batches
    if isinstance(total, int) and total < prune_at:
        raise PrunerError(
            f"the train loader has {total} batches per epoch, fewer than the {prune_at} batches before "
            "pruning (the first epoch holds them all): add recovery data or lower calibration_batches/prune_at_step"
        )


def check_step_plan(trainer: pl.Trainer, plan, structure, model: nn.Module,
                    lora_targets: tuple[str, ...] | None) -> None:
    """Before a step's weights change: every rank chose this plan, and LoRA targets survive it."""
    check_ranks_agree(trainer, plan)
    if lora_targets is None:
        return
    removed = [structure.layers[lp.index].path for lp in plan.layers if lp.removed]
    gone = missing_targets(model, lora_targets, removed) if removed else []
    if gone:
        raise PrunerError(
            f"LoRA target(s) {gone} exist only in layers the plan removes ({removed}): target module "
            "names without a layer index (e.g. q_proj), or keep those layers out of `layers`"
        )
