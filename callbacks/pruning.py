"""``StructuralPruneCallback``: LLM-Pruner inside ``Trainer.fit`` of any LightningModule.

**The contract, whole:** the LightningModule holds a ``transformers`` causal LM (a
``PreTrainedModel`` with a language-modelling head) at any attribute path, and its
``training_step`` returns a loss whose backward reaches that model. Nothing else: its loss,
batch format, ``configure_optimizers``, schedulers and logging stay its own.

The callback translates hooks; the work is a :class:`pruner.loop.PruneSession`'s: the
``calibration_batches`` train batches before the prune step run through the module's own
``training_step`` and backward while the session records importance (the optimizers' steps are
paused: no weight moves); after the last of them the session prunes the same model object in
place (scores summed over ranks, every rank the same plan); then LoRA is attached (peft), the
optimizers, schedulers and DDP/FSDP2 wrappers are rebuilt, the remaining batches are recovery
steps, and at the end of fit the merged model is exported. Its other concerns live beside it:
``checks`` (refusals before work), ``calibration`` (paused optimizers), ``distributed``,
``resume``, ``export`` and ``report``.

Optional hooks, duck-typed, never required: ``module.tokenizer`` / ``datamodule.tokenizer``
(saved with the export), ``datamodule.calibration_batches`` (the count when
``calibration_batches=None``), ``datamodule.reconstruction_batches()`` (the refit's text),
``datamodule.val_dataloader()`` of dicts with ``input_ids`` (the perplexity report),
``module.wants_teacher`` + ``module.keep_teacher(model)`` (the dense model for distillation; under
FSDP2 ``keep_teacher(model, copy=False)``, where accepted, hands over the dense shards themselves),
``module.shard_model()`` (FSDP2 sharding of the pruned model).

Example (a tiny random LLaMA in an ordinary LightningModule; a few seconds on a CPU):
    >>> import lightning as L, torch
    >>> from pruner.callbacks import StructuralPruneCallback
    >>> from pruner.testing import tiny_causal_lm
    >>> class Finetune(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = tiny_causal_lm("llama")
    ...     def training_step(self, batch, batch_idx):
    ...         return self.model(input_ids=batch, labels=batch).loss
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
    >>> batches = torch.utils.data.DataLoader([torch.randint(3, 120, (2, 16)) for _ in range(6)], batch_size=None)
    >>> prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=4, verbose=False)
    >>> trainer = L.Trainer(accelerator="cpu", max_steps=6, callbacks=[prune], logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.fit(Finetune(), batches)
    >>> prune.plan.params["after"] < prune.plan.params["before"]
    True

YAML (``python -m pruner fit --config ...``)::

    trainer:
      callbacks:
        - class_path: pruner.callbacks.StructuralPruneCallback
          init_args: {target_sparsity: 0.2, attention_layers: [4, 28], mlp_layers: [4, 28]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from pruner.batches import check_inputs
from pruner.checks import plain
from pruner.config import PruneConfig
from pruner.distributed.gather import build_skeleton, discovery_copy, meta_copy, skeleton_from, unsharded_copy
from pruner.distributed.sliced import parameters_made_by
from pruner.distributed.window import LayerWindow
from pruner.errors import PrunerError
from pruner.io import find_causal_lm
from pruner.loop import PruneSession, calibration_reruns
from pruner.recovery.lora import DEFAULT_TARGETS, LoraSettings
from pruner.structure import Plan

from . import checks
from .calibration import PausedOptimizers, batch_samples, model_inputs
from .distributed import gather_reason, install_sharded, rebuild_training, strategy_ranks, unwrap_ddp
from .export import export_pruned, export_tokenizer, merged_model, merged_weights
from .report import measure_perplexity, pruning_report, window_protocol
from .recovery import attach_seeded_lora, keep_teacher, teacher_in_place, wants_dense_teacher
from .resume import (STATE_VERSION, check_resumable, checkpointed_model, install_resume_hook,
                     install_sharded_resume_hook, rebuild_sharded, rebuild_structure, remove_resume_hook)


class StructuralPruneCallback(pl.Callback):
    """Calibrates, prunes, recovers and exports the Hugging Face causal LM of any LightningModule.

    Pruning options (see ``pruner.config.PruneConfig``; give exactly one of
    ``target_sparsity`` / ``pruning_ratio``):

    Args:
        criterion: importance criterion: element1 (paper default), element2, mix, vector,
            l1, l2, random, activation. element2/mix need calibration batches of one sample.
        aggregation: how a group's member scores combine: sum, mean, max, prod, last.
        mode: block (heads + MLP channels), channel (hidden size) or layer (whole layers).
        target_sparsity: fraction of parameters to remove (e.g. 0.2), of all of them or of the
            decoder layers' (``target_scope``).
        target_scope: model (all parameters, embeddings included) or layers (the decoder
            layers' parameters: for small models whose embeddings are a large share).
        pruning_ratio: the paper's per-structure ratio inside the pruned layer ranges.
        attention_layers: half-open [start, end) of layers whose heads are pruned; None = all.
        mlp_layers: half-open [start, end) of layers whose MLP channels are pruned; None = all.
        layers: layer mode: half-open range of removable layers; None = all.
        head_granularity: query (query heads evenly inside each KV group) or kv (whole groups);
            None = kv with global ranking, else query.
        prune_attention: block mode: prune attention heads.
        prune_mlp: block mode: prune MLP channels.
        global_ranking: rank groups across layers by score per parameter; None = True with
            target_sparsity, False with pruning_ratio or uniform.
        max_layer_ratio: global ranking: at most this fraction of a layer's groups goes.
        attention_selection: which heads / KV groups a layer loses: score (the paper),
            measured (calibration loss with them masked, on the calibration batches this
            callback keeps) or obs (block Optimal Brain Surgeon on the refit's statistics;
            needs reconstruct).
        round_to: kept MLP/hidden widths become multiples of this; None = 32 for widths that
            are multiples of 32 of at least 1024 (LLaMA-class layers: GGUF quantization blocks,
            kernel-friendly widths), else 1.
        uniform: every layer keeps the same widths (a plain config for vLLM / TGI /
            TensorRT-LLM and llama.cpp's ``llama`` architecture); needs local allocation over
            every layer.
        iterative_steps: prune in N steps. Step 1 uses the importance of the calibration
            batches of the fit; steps 2..N re-estimate it on the same batches (kept by the
            callback, a few KB) on the partly pruned model, as ``pruner.prune`` does.
        reconstruct: refit the kept input columns of o_proj / down_proj by ridge least squares
            so that each pruned layer reproduces the dense layer's output (no training). The
            input statistics come from the datamodule's ``reconstruction_batches()`` when it
            has any, else from the calibration batches, kept for it (few tokens: a larger
            ``reconstruct_damping``; they must then be dict batches holding ``input_ids``).
        reconstruct_damping: the refit's ridge term, relative to the mean input energy.
        mlp_selection: which MLP channels a layer loses: score (the paper), obs (greedy
            Optimal Brain Surgeon on the refit's statistics; needs reconstruct) or obs-fisher
            (the same with each output weighted by the loss's diagonal Fisher, from backward
            passes over ``fisher_samples`` sequences of the refit's text at the prune step).
        fisher_samples: sequences (all ranks together) of the refit's text that run backward for
            obs-fisher: the datamodule's reconstruction batches, else the calibration batches.
        regional_epochs: after the refit, train each pruned layer's MLP alone for this many
            epochs over the datamodule's ``reconstruction_batches()`` (needed) so that the layer
            gives the dense layer's output, layer by layer (``pruner.refit.regional``); 0 = off. Under
            DDP / FSDP2 each rank steps through its own text, gradients summed over ranks.
        regional_lr: AdamW learning rate of the regional fit.
        seed: seed of the random criterion, of structure probing and of the LoRA weights.

    Callback options:

    Args:
        calibration_batches: train batches (per rank) that feed importance; None = the
            datamodule's ``calibration_batches`` attribute (``PruneDataModule`` has one).
        prune_at_step: prune after this many train batches of the first epoch; calibration
            covers the ``calibration_batches`` batches just before it and earlier batches are
            ordinary (dense) training steps. None = right after the calibration batches.
        model_attribute: dotted attribute path of the causal LM in the module (e.g.
            ``"backbone.lm"``); None = find it (the outermost transformers causal LM).
        attach_lora: attach LoRA adapters in place after pruning (only they train); False =
            fine-tune every weight of the pruned model.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA settings (LLM-Pruner's:
            8, 16, 0.05, every projection).
        export_dir: at the end of fit, merge LoRA and export the pruned model here (a folder
            for ``pruner.load_pretrained``); checked when fit starts; None = no export.
        overwrite_export: replace an existing export of this package in ``export_dir``.
        tokenizer: saved with the export: a tokenizer object, or a model name / folder to load
            it from; None = ``module.tokenizer`` or ``datamodule.tokenizer`` if any.
        report_perplexity: measure perplexity on the datamodule's validation data before
            pruning, right after it and after recovery (``report.md`` in the export and
            ``callback.perplexity``); skipped without dict batches of ``input_ids``.
        verbose: log parameter counts and the export path (rank 0).

    Strategies: one device, DDP and ``ModelParallelStrategy`` (FSDP2, data parallel); under
    FSDP2 the pruned model is a new object at the model's attribute path (read it from there).
    A checkpoint holds the LoRA-wrapped pruned model and resumes (``ckpt_path``), also in the
    middle of calibration; the export holds the merged one. ``docs/how-it-works.md`` says how
    each strategy, gradient accumulation and resuming are handled.
    """

    def __init__(
        self,
        criterion: str = "element1",
        aggregation: str = "sum",
        mode: Literal["block", "channel", "layer"] = "block",
        target_sparsity: float | None = None,
        target_scope: Literal["model", "layers"] = "model",
        pruning_ratio: float | None = None,
        attention_layers: tuple[int, int] | None = None,
        mlp_layers: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
        head_granularity: Literal["query", "kv"] | None = None,
        prune_attention: bool = True,
        prune_mlp: bool = True,
        global_ranking: bool | None = None,
        max_layer_ratio: float = 0.9,
        attention_selection: Literal["score", "measured", "obs"] = "score",
        round_to: int | None = None,
        uniform: bool = False,
        iterative_steps: int = 1,
        reconstruct: bool = False,
        reconstruct_damping: float = 0.1,
        mlp_selection: Literal["score", "obs", "obs-fisher"] = "score",
        fisher_samples: int = 16,
        regional_epochs: int = 0,
        regional_lr: float = 1e-3,
        seed: int = 0,
        calibration_batches: int | None = None,
        prune_at_step: int | None = None,
        model_attribute: str | None = None,
        attach_lora: bool = True,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: Sequence[str] = DEFAULT_TARGETS,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        tokenizer: Any = None,
        report_perplexity: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        # PruneConfig and LoraSettings check their options with their own exact messages.
        self.config = PruneConfig(
            criterion=criterion, aggregation=aggregation, mode=mode, target_sparsity=target_sparsity,
            target_scope=target_scope, pruning_ratio=pruning_ratio, attention_layers=attention_layers,
            mlp_layers=mlp_layers, layers=layers, head_granularity=head_granularity, prune_attention=prune_attention,
            prune_mlp=prune_mlp, global_ranking=global_ranking, max_layer_ratio=max_layer_ratio,
            round_to=round_to, uniform=uniform, iterative_steps=iterative_steps, seed=seed,
            attention_selection=attention_selection,
            reconstruct=reconstruct, reconstruct_damping=reconstruct_damping, mlp_selection=mlp_selection,
            fisher_samples=fisher_samples, regional_epochs=regional_epochs, regional_lr=regional_lr,
        )
        self.lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                 target_modules=tuple(lora_target_modules)
                                 if isinstance(lora_target_modules, (list, tuple)) else lora_target_modules)
        calibration_batches, prune_at_step = plain(calibration_batches), plain(prune_at_step)
        checks.check_options(calibration_batches, prune_at_step, model_attribute, export_dir, tokenizer,
                             attach_lora=attach_lora, overwrite_export=overwrite_export,
                             report_perplexity=report_perplexity, verbose=verbose)
        self.calibration_batches = calibration_batches
        self.prune_at_step = prune_at_step
        self.model_attribute = model_attribute
        self.attach_lora = attach_lora
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.tokenizer = tokenizer
        self.report_perplexity = report_perplexity
        self.verbose = verbose
        self.perplexity: dict[str, float] = {}  # "dense", "pruned", "recovered" on the validation data
        self.plan: Plan | None = None  # once pruned (also after resuming)
        self.vectors: dict | None = None  # the importance vectors the plan was selected from
        self.export_path: Path | None = None  # the folder written at the end of fit
        self.model_path: str | None = None  # where the causal LM sits in the module ("" = the module)
        self.session: PruneSession | None = None  # calibration state until the prune step
        self._pruned = False
        self._lora_attached = False
        self._num_calibration: int | None = None
        self._paused: PausedOptimizers | None = None
        self._pending: dict[str, Any] = {}  # a checkpoint's session state, until the session exists
        self._counts = {"calibrated_batches": 0, "tokens_per_sample": 0}  # this rank's calibration, once pruned
        self._first_epoch_batches = 0  # train batches the first epoch has run (it must reach the prune step)
        self._sharded = False  # ModelParallelStrategy (FSDP2)
        self._pruned_skeleton = None  # (class, config, shapes) of the pruned model, for the FSDP2 export

    # ------------------------------------------------------------------ hooks: a guard and one named call each

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        remove_resume_hook(pl_module, trainer.strategy)
        if not self._pruned:
            checks.check_loader_length(trainer, self._prune_at)
        if not self._pruned and self.session.batches:  # resumed in the middle of calibration
            checks.check_resumable_loader(trainer, self.session.batches)
        if not self._pruned and "dense" not in self.perplexity:  # after any checkpoint loaded (FSDP2's after fit start)
            self._measure(trainer, pl_module, "dense")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._pruned and self._in_calibration(trainer, batch_idx):
            self._calibration_batch(trainer, pl_module, batch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.current_epoch == 0:
            self._first_epoch_batches = batch_idx + 1
        if self._recording and self._in_calibration(trainer, batch_idx) and not ran_backward(outputs):
            self.session.discard_last()  # training_step returned None: Lightning ran no backward
        elif self._sharded and self._recording and self._in_calibration(trainer, batch_idx):
            self.session.accumulate_shards(trainer.world_size)  # FSDP2: read this backward's shards
        if not self._pruned and trainer.current_epoch == 0 and batch_idx == self._prune_at - 1:
            self._prune(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruned and trainer.current_epoch == 0:
            stopped = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
            checks.check_epoch_reached_prune_step(self._first_epoch_batches, self._prune_at, stopped,
                                                  resumable=trainer.checkpoint_callback is not None)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording:
            self.session.pause()  # validation must not feed calibration

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording:
            self.session.resume()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_calibration()  # hooks removed, requires_grad flags and optimizer steps restored
        remove_resume_hook(pl_module, trainer.strategy)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION, "settings": self._settings(), "pruned": self._pruned,
            "plan": self.plan.to_dict() if self.plan else None, "model_path": self.model_path,
            "lora": self._lora_attached, "num_calibration": self._num_calibration, "perplexity": dict(self.perplexity),
            **self._counts,
        }
        state.update(self.session.state_dict() if self.session is not None else self._pending)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumable(state_dict, self._settings())
        self._pruned = bool(state_dict["pruned"])
        self.plan = Plan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self.model_path = state_dict.get("model_path")
        self._lora_attached = bool(state_dict.get("lora"))
        self._num_calibration = state_dict.get("num_calibration")
        self.perplexity = dict(state_dict.get("perplexity", {}))
        self._counts = {k: int(state_dict.get(k, 0)) for k in self._counts}
        self._pending = {k: state_dict[k] for k in ("calibrated_batches", "tokens_per_sample", "calibration_inputs",
                                                     "importance", "grams", "gram_tokens") if k in state_dict}

    # ------------------------------------------------------------------ the model and where calibration is

    def model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The causal LM this callback prunes, read from its attribute path in ``pl_module``."""
        return pl_module.get_submodule(self.model_path) if self.model_path else pl_module

    @property
    def _recording(self) -> bool:
        return self.session is not None and self.session.recording

    @property
    def _prune_at(self) -> int:
        return self.prune_at_step if self.prune_at_step is not None else self._num_calibration

    def _in_calibration(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.current_epoch == 0 and self._prune_at - self._num_calibration <= batch_idx < self._prune_at

    def _settings(self) -> dict[str, Any]:
        """What a resumed fit must share with the checkpoint (JSON-normalised)."""
        settings = {**self.config.to_dict(), "attach_lora": self.attach_lora, "lora": asdict(self.lora),
                    "calibration_batches": self.calibration_batches, "prune_at_step": self.prune_at_step}
        return json.loads(json.dumps(settings))

    # ------------------------------------------------------------------ setup and fit start: checked early

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What can be checked before the model exists (Lightning builds it in
        ``configure_model``, after ``setup``): strategy, precision, counts, the export folder."""
        self._sharded = checks.check_strategy(trainer, self.config)
        if not self._pruned:
            self._num_calibration = checks.resolve_calibration_batches(trainer, self.calibration_batches,
                                                                       self.prune_at_step)
        checks.check_export_folder(trainer, self.export_dir, self.overwrite_export)
        checks.check_datamodule(trainer, self.config)
        install_resume_hook(pl_module, self.state_key, lambda state: self._rebuild(pl_module, state))
        if self._sharded:
            install_sharded_resume_hook(trainer.strategy, self.state_key,
                                        lambda state: self._rebuild_sharded(trainer, pl_module, state))

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finds the model and, unless resumed after pruning, checks it and starts the session
        (discovery); all before the first calibration batch."""
        if self._pruned:  # resumed: the structure was rebuilt before the weights loaded
            if self.model_path is None:
                self.model_path = find_causal_lm(pl_module, self.model_attribute)[0]
            return
        self.model_path, model = find_causal_lm(pl_module, self.model_attribute)
        checks.check_model(trainer, pl_module, model, model_path=self.model_path, sharded=self._sharded,
                           lora_targets=self.lora.target_modules if self.attach_lora else None,
                           prune_at=self._prune_at, export_dir=self.export_dir)
        # discovery probes layers with real tensors: under FSDP2 a copy of the embedding and the
        # decoder layers up to the last one it probes, gathered tensor by tensor
        self.session = PruneSession(model, self.config, sharded=self._sharded,
                                    probe=discovery_copy(model) if self._sharded else None)
        if self._pending:
            self.session.load_state_dict(self._pending)
            self._pending = {}

    def _rebuild(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """The checkpoint's structure on the freshly built dense model (before its weights load): the
        plan applied, LoRA attached. A distilling module gets its teacher first, from the freshly
        built dense model: calibration moves no weight, so it is the model kept before surgery."""
        check_resumable(state, self._settings())
        if state.get("pruned") and self._sharded:
            return  # rebuilt, sharded, as the strategy began to load the checkpoint (_rebuild_sharded)
        if state.get("pruned"):
            keep_teacher(pl_module, checkpointed_model(pl_module, state))
        rebuild_structure(pl_module, state, self.lora)

    def _rebuild_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """FSDP2: the checkpoint's pruned structure, sharded, and its optimizers, before the
        strategy loads the weights and optimizer states into them (:func:`rebuild_sharded`)."""
        check_resumable(state, self._settings())
        if state.get("pruned"):
            self.model_path = state.get("model_path")
            # (Lightning's fit start ran before the checkpoint path was known: its discovery serves here)
            structure = self.session.structure if self.session is not None else None
            self._pruned_skeleton = rebuild_sharded(trainer, pl_module, state, self.lora, self.config.seed, structure)
            self.session = None

    # ------------------------------------------------------------------ calibration

    def _calibration_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._recording:
            self._start_calibration(trainer, pl_module)
        model = self.model(pl_module)
        inputs = model_inputs(batch)
        if inputs is not None:
            check_inputs(inputs, model.config, f"calibration batch {self.session.batches}")
        elif self.session.keeps_inputs:
            raise PrunerError(
                f"{self._reruns()} runs the calibration batches again itself, which needs dict batches holding "
                f"'input_ids' (and optionally 'attention_mask', 'labels'); got {type(batch).__name__}"
            )
        model.eval()  # no dropout in importance (as pruner.prune); Lightning may re-enable it
        self.session.record(inputs, batch_samples(batch))

    def _reruns(self) -> str | None:
        return calibration_reruns(self.config, has_text=bool(self.session.reconstruction))

    def _start_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unwrap_ddp(trainer)
        self._paused = PausedOptimizers(trainer.optimizers)
        make = getattr(trainer.datamodule, "reconstruction_batches", None) if self.config.reconstruct else None
        text = list(make()) if callable(make) else []  # this rank's refit text (the same count on every rank)
        if self.config.regional_epochs and not text:
            raise PrunerError("StructuralPruneCallback(regional_epochs=...): the datamodule's reconstruction_batches() "
                              "gave no batch on this rank: give it text (data.reconstruction_source), or set "
                              "regional_epochs: 0")
        self.session.start_recording(self.model(pl_module), text)

    def _stop_calibration(self) -> None:
        if self._recording:
            self.session.pause()
        if self._paused is not None:
            self._paused.resume()
            self._paused = None

    # ------------------------------------------------------------------ the prune step

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._recording:
            raise PrunerError("no calibration batch was seen before the prune step")
        self._stop_calibration()
        pl_module.zero_grad(set_to_none=True)
        session, sharded, dense = self.session, self._sharded, self.model(pl_module)
        # FSDP2: a distilling module keeps the dense model's own shards, swapped out below, as teacher
        shared_teacher = sharded and wants_dense_teacher(pl_module) and teacher_in_place(pl_module, dense)
        sliced = sharded and self._slices_shards(pl_module, shared_teacher)
        windowed = sliced and self.config.reconstruct  # the refit gathers one decoder layer at a time
        lora = self.lora.target_modules if self.attach_lora else None
        self.plan = session.prune(
            dense, ranks=strategy_ranks(trainer, pl_module.device),
            loss_scale=float(trainer.accumulate_grad_batches),
            check=lambda plan, structure: checks.check_step_plan(
                trainer, plan, structure, pl_module if sharded else dense, lora),
            before_surgery=None if shared_teacher else lambda model: keep_teacher(pl_module, model),
            unshard=meta_copy if sliced else unsharded_copy if sharded else None,
            window=LayerWindow if windowed else None)
        model, self.vectors, self.session, self._pruned = session.model, session.vectors, None, True
        self._counts = {"calibrated_batches": session.batches, "tokens_per_sample": session.tokens_per_sample}
        model.train()
        if sharded:
            self._pruned_skeleton = build_skeleton(model)
        else:
            self._measure(trainer, pl_module, "pruned")
        lora_values = None
        if self.attach_lora and sliced:  # drawn now as on a real model, written into the shards below
            lora_values = parameters_made_by(model, lambda m: attach_seeded_lora(m, self.lora, self.config.seed))
        elif self.attach_lora:
            attach_seeded_lora(model, self.lora, self.config.seed)
        self._lora_attached = self.attach_lora
        if sharded:
            values = {**(lora_values or {}), **(session.window.values if windowed else {})}
            install_sharded(trainer, pl_module, self.model_path, model, dense,
                            (self.plan, session.structure, values) if sliced else None)
            if shared_teacher:
                pl_module.keep_teacher(dense, copy=False)
            del dense
            self._measure(trainer, pl_module, "pruned")
        rebuild_training(trainer)
        if self.verbose:
            self._log_prune_step(pl_module)

    def _slices_shards(self, pl_module: pl.LightningModule, shared_teacher: bool) -> bool:
        """FSDP2: whether the prune step slices the shards (no rank holds the whole model) or
        gathers an unsharded copy on every rank (said once, with the reason)."""
        why = gather_reason(wants_dense_teacher(pl_module) and not shared_teacher)
        if why is not None and self.verbose:
            rank_zero_info(f"StructuralPruneCallback: the prune step gathers an unsharded copy of the model on every "
                           f"rank: {why}; without it the ranks prune their own shards")
        return why is None

    def _log_prune_step(self, pl_module: pl.LightningModule) -> None:
        p = self.plan.params
        rank_zero_info(
            f"StructuralPruneCallback: pruned at batch {self._prune_at}: {p['before']:,} -> {p['after']:,} "
            f"parameters ({p['removed_fraction']:.1%} removed; {p['removed_layer_fraction']:.1%} of the decoder "
            f"layers'); trainable now "
            f"{sum(q.numel() for q in pl_module.parameters() if q.requires_grad):,}"
        )
        fit = self.plan.calibration.get("regional")
        if fit and fit["layers"]:
            before, after = (sum(fit[k]) / len(fit[k]) for k in ("error_before", "error_after"))
            rank_zero_info(f"StructuralPruneCallback: regional fit of {len(fit['layers'])} MLPs: mean relative "
                           f"error {before:.4f} -> {after:.4f} in {fit['seconds']:.0f} s")

    # ------------------------------------------------------------------ measuring and export

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        if not self.report_perplexity:
            return
        value = measure_perplexity(trainer, self.model(pl_module), pl_module.device, when)
        if value is not None:
            self.perplexity[when] = value
            if self.verbose:
                rank_zero_info(f"StructuralPruneCallback: validation perplexity ({when}): {value:.2f}")

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruned and trainer.checkpoint_callback is not None:
            self._stop_calibration()
            rank_zero_warn(f"StructuralPruneCallback: fit stopped at step {trainer.global_step}, before the prune step "
                           f"after batch {self._prune_at}: the model is not pruned yet and nothing was exported; resume "
                           "from the last checkpoint (ckpt_path) to go on")
            return
        if not self._pruned:
            self._stop_calibration()
            raise PrunerError(
                f"fit stopped before the prune step after batch {self._prune_at} (at global step {trainer.global_step}: "
                "max_time, early stopping or should_stop ended it): the model was not pruned and nothing was "
                "exported; let the fit run past the prune step")
        if self.export_dir is None:
            return
        self._measure(trainer, pl_module, "recovered")
        weights = None
        if self._sharded:  # rank 0 writes the tensors as they are gathered, layer by layer
            model = skeleton_from(*self._pruned_skeleton)
            weights = merged_weights(self.model(pl_module), self._pruned_skeleton,
                                     self.lora if self._lora_attached else None, keep=trainer.is_global_zero)
        else:
            model = merged_model(self.model(pl_module))
        folder = Path(self.export_dir).expanduser().absolute()
        report = pruning_report(self.plan, self.perplexity, trainer.global_step - self._prune_at,
                                window_protocol(trainer))
        tokenizer = export_tokenizer(self.tokenizer, [pl_module, trainer.datamodule]) if trainer.is_global_zero else None
        export_pruned(trainer, model, folder, self.plan, tokenizer=tokenizer, overwrite=self.overwrite_export,
                      report=report, weights=weights)
        self.export_path = folder
        if self.verbose:
            rank_zero_info(f"StructuralPruneCallback: exported the pruned model to {self.export_path}")


def ran_backward(outputs: Any) -> bool:
    """Whether a training step's outputs (as Lightning hands them to ``on_train_batch_end``) carry a
    loss: a step that returned None gives None or ``{}`` and Lightning skips its backward."""
    if outputs is None:
        return False
    return not isinstance(outputs, dict) or outputs.get("loss") is not None

