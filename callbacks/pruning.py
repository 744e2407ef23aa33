"""``StructuralPruneCallback``: LLM-Pruner inside ``Trainer.fit`` of any LightningModule.

**The contract, whole:** the LightningModule holds a ``transformers`` causal LM (a
``PreTrainedModel`` with a language-modelling head, e.g. from ``AutoModelForCausalLM``) at any
attribute path, and its ``training_step`` returns a loss whose backward reaches that model.
Nothing else: the module imports nothing from this package, and its loss, batch format,
``configure_optimizers``, schedulers and logging stay its own.

A fit with the callback:

1. ``on_fit_start``: the callback finds the model (the outermost such ``PreTrainedModel``, or
   ``model_attribute``) and discovers its coupled structures;
2. calibration: the ``calibration_batches`` train batches just before the prune step (by default
   the first ones) run through the module's own ``training_step`` and backward; gradient hooks
   accumulate importance, and the optimizers' steps are paused, so no weight moves, whatever
   the optimizer (``callbacks/calibration.py`` says how ``global_step`` and schedulers behave);
3. the prune step, after the last calibration batch: the accumulators are summed over ranks
   (one all-reduce), the plan is selected by :func:`pruner.loop.steps.prune_steps` (the loop
   ``pruner.prune`` runs too; every rank must agree) and removed in place from the same model
   object, LoRA is attached in place (peft; base weights frozen), and the optimizers,
   schedulers and DDP wrapper are rebuilt from the module's ``configure_optimizers``;
4. the remaining batches are ordinary recovery steps;
5. at the end of fit, with ``export_dir``: LoRA merged, :func:`pruner.save_pretrained`.

Optional hooks, duck-typed, never required:
  * ``module.tokenizer`` or ``datamodule.tokenizer``: saved with the export (or ``tokenizer=``);
  * ``datamodule.calibration_batches`` (int): the count when ``calibration_batches=None``;
  * ``datamodule.reconstruction_batches()``: this rank's ``input_ids`` batches for the refit;
  * ``datamodule.val_dataloader()`` of dict batches with ``input_ids``: the perplexity report;
  * ``module.wants_teacher`` (bool) and ``module.keep_teacher(model)``: a frozen copy of the
    dense model, kept just before surgery, for distillation during recovery;
  * ``module.shard_model()``: FSDP2 sharding of the pruned model (default: per decoder layer,
    then the model, on the strategy's data-parallel mesh).

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
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.recovery import DEFAULT_TARGETS, LoraSettings

from .calibration import PausedOptimizers, batch_samples, model_inputs
from .distributed import (all_reduce_dict, check_ranks_agree, data_parallel_mesh, is_fsdp_module,
                          rebuild_training, shard_causal_lm, unwrap_ddp)
from .report import pruning_report

STATE_VERSION = 2  # callback state layout in checkpoints (1: pruner <= 0.1.0 before this file)


class StructuralPruneCallback(pl.Callback):
    """Calibrates, prunes, recovers and exports the Hugging Face causal LM of any LightningModule.

    Pruning options (see ``pruner.config.PruneConfig``; give exactly one of
    ``target_sparsity`` / ``pruning_ratio``):

    Args:
        criterion: importance criterion: element1 (paper default), element2, mix, vector,
            l1, l2, random, activation. element2/mix need calibration batches of one sample.
        aggregation: how a group's member scores combine: sum, mean, max, prod, last.
        mode: block (heads + MLP channels), channel (hidden size) or layer (whole layers).
        target_sparsity: fraction of ALL parameters to remove (e.g. 0.2).
        pruning_ratio: the paper's per-structure ratio inside the pruned layer ranges.
        attention_layers: half-open [start, end) of layers whose heads are pruned; None = all.
        mlp_layers: half-open [start, end) of layers whose MLP channels are pruned; None = all.
        layers: layer mode: half-open range of removable layers; None = all.
        head_granularity: query (query heads evenly inside each KV group) or kv (whole groups);
            None = kv with global ranking, else query.
        prune_attention: block mode: prune attention heads.
        prune_mlp: block mode: prune MLP channels.
        global_ranking: rank groups across layers by score per parameter; None = True with
            target_sparsity (the best allocation measured), False with pruning_ratio or uniform.
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
            has any, else from the calibration batches (too few on the paper's budget: the
            refit then needs ``reconstruct_damping`` about 0.1; see docs/results.md).
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

    Notes:
        * Strategies: single device, DDP and ``ModelParallelStrategy`` (FSDP2, data parallel).
          Under DDP calibration runs on the bare module (each rank sums its own gradients) and
          the wrapper is rebuilt after pruning. Under FSDP2 each rank keeps running sums of its
          gradient *shards*; one all-reduce of the partial score vectors gives the exact
          scores. At the prune step the weights are gathered into an ordinary CPU copy (every
          rank), pruned, given LoRA, sharded again and put at the model's attribute path (so
          ``self.model`` is a new object there: read it from the attribute, not a reference
          kept from before); the export is gathered on rank 0. FSDP2 supports the
          gradient-sum criteria (element1, vector) and the gradient-free ones, not
          element2/mix, measured attention selection, iterative steps or resuming.
        * ``trainer.accumulate_grad_batches``: Lightning divides each loss by it; the
          accumulators are rescaled, so importance does not depend on it.
        * Resuming (``ckpt_path``): the callback's state holds the plan, its settings and
          counts; before Lightning loads the weights, the callback rebuilds the pruned (+ LoRA)
          structure on the freshly built dense model. A checkpoint written during calibration
          resumes the importance accumulators. A checkpoint whose pruning settings differ from
          this callback's is refused, naming the settings.
        * A checkpoint holds the LoRA-wrapped pruned model; the export holds the merged one.
          ``load_pruned_checkpoint(module, path)`` rebuilds a module from a checkpoint
          without a Trainer.
    """

    def __init__(
        self,
        criterion: str = "element1",
        aggregation: str = "sum",
        mode: Literal["block", "channel", "layer"] = "block",
        target_sparsity: float | None = None,
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
            pruning_ratio=pruning_ratio, attention_layers=attention_layers, mlp_layers=mlp_layers,
            layers=layers, head_granularity=head_granularity, prune_attention=prune_attention,
            prune_mlp=prune_mlp, global_ranking=global_ranking, max_layer_ratio=max_layer_ratio,
            round_to=round_to, uniform=uniform, iterative_steps=iterative_steps, seed=seed,
            attention_selection=attention_selection,
            reconstruct=reconstruct, reconstruct_damping=reconstruct_damping, mlp_selection=mlp_selection,
            fisher_samples=fisher_samples, regional_epochs=regional_epochs, regional_lr=regional_lr,
        )
        self.lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                 target_modules=tuple(lora_target_modules)
                                 if isinstance(lora_target_modules, (list, tuple)) else lora_target_modules)
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
        for name, value in (("attach_lora", attach_lora), ("overwrite_export", overwrite_export),
                            ("report_perplexity", report_perplexity), ("verbose", verbose)):
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
        self.plan = None  # pruner.structure.Plan once pruned (also after resuming)
        self.vectors: dict | None = None  # the importance vectors the plan was selected from
        self.export_path: Path | None = None  # the folder written at the end of fit
        self.model_path: str | None = None  # where the causal LM sits in the module ("" = the module)
        self._pruned = False
        self._lora_attached = False
        self._num_calibration: int | None = None
        self._structure = None
        self._fingerprint = ""
        self._total_before = 0
        self._calibrated_batches = 0
        self._tokens_per_sample = 0
        self._estimator = None
        self._collector = None  # GramCollector (reconstruct) fed by the calibration batches
        self._paused: PausedOptimizers | None = None
        self._pending: dict[str, Any] = {}  # accumulators from a mid-calibration checkpoint
        self._calibration_inputs: list[dict[str, torch.Tensor]] = []
        self._reconstruction_batches: list[torch.Tensor] = []  # this rank's refit text (datamodule)
        self._sharded = False  # ModelParallelStrategy (FSDP2)
        self._pruned_skeleton = None  # (class, config, shapes) of the pruned model, for the FSDP2 export

    # ------------------------------------------------------------------ hooks (thin)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_resume_hook(pl_module)
        self._check_loader_length(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._pruned and self._in_calibration(trainer, batch_idx):
            self._calibration_batch(trainer, pl_module, batch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._sharded and self._estimator is not None and self._in_calibration(trainer, batch_idx):
            self._estimator.accumulate_gradients(trainer.world_size)  # FSDP2: read this backward's shards
        if not self._pruned and trainer.current_epoch == 0 and batch_idx == self._prune_at - 1:
            self._prune(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_recording(False)  # validation must not feed calibration

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_recording(True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_calibration()  # hooks removed, requires_grad flags and optimizer steps restored
        self._remove_resume_hook(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION, "settings": self._settings(), "pruned": self._pruned,
            "plan": self.plan.to_dict() if self.plan else None, "model_path": self.model_path,
            "lora": self._lora_attached, "num_calibration": self._num_calibration,
            "calibrated_batches": self._calibrated_batches, "perplexity": dict(self.perplexity),
            "tokens_per_sample": self._tokens_per_sample,
        }
        if self._estimator is not None:  # a checkpoint in the middle of calibration
            state["importance"] = {k: v.detach().cpu() for k, v in self._estimator.state().items()}
            state["calibration_inputs"] = self._calibration_inputs
        if self._collector is not None:  # exact resume of the refit's statistics (fp64, in_features² each)
            state["grams"] = {k: v.detach().cpu() for k, v in self._collector.grams.items()}
            state["gram_tokens"] = dict(self._collector.tokens)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from pruner.structure import Plan

        self._check_resumable(state_dict)
        self._pruned = bool(state_dict["pruned"])
        self.plan = Plan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self.model_path = state_dict.get("model_path")
        self._lora_attached = bool(state_dict.get("lora"))
        self._num_calibration = state_dict.get("num_calibration")
        self._calibrated_batches = int(state_dict.get("calibrated_batches", 0))
        self._tokens_per_sample = int(state_dict.get("tokens_per_sample", 0))
        self.perplexity = dict(state_dict.get("perplexity", {}))
        self._calibration_inputs = list(state_dict.get("calibration_inputs", []))
        self._pending = {k: state_dict[k] for k in ("importance", "grams", "gram_tokens") if k in state_dict}

    # ------------------------------------------------------------------ setup: everything checked early

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks what can be checked before the model exists (Lightning builds it in
        ``configure_model``, after ``setup``): strategy, precision, counts, the export folder."""
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if self._sharded:
            self._check_sharded_setup()
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
        if not self._pruned:
            self._num_calibration = self._resolve_calibration_batches(trainer)
        if self.export_dir is not None and trainer.is_global_zero:
            from pruner.io import check_export_target

            check_export_target(self.export_dir, self.overwrite_export)
        dm_hparams = getattr(trainer.datamodule, "hparams", None) or {}
        if dm_hparams.get("reconstruction_source") and not self.config.reconstruct:
            raise PrunerError(
                f"the datamodule has reconstruction_source={dm_hparams['reconstruction_source']!r}, text for the "
                "least-squares refit, but StructuralPruneCallback(reconstruct=False) would not use it: set "
                "reconstruct: true, or data.reconstruction_source: null"
            )
        if self.config.regional_epochs and not callable(getattr(trainer.datamodule, "reconstruction_batches", None)):
            raise PrunerError(
                "StructuralPruneCallback(regional_epochs=...) fits the pruned MLPs on the refit's text, which comes "
                "from the datamodule's reconstruction_batches() (input_ids batches): give the datamodule that method "
                "(PruneDataModule: data.reconstruction_source), or set regional_epochs: 0"
            )
        self._install_resume_hook(trainer, pl_module)

    def _check_sharded_setup(self) -> None:
        if self.config.criterion in ("element2", "mix"):
            raise PrunerError(
                f"criterion {self.config.criterion!r} needs per-sample gradients, but under ModelParallelStrategy "
                "(FSDP2) gradients are averaged over ranks before any rank sees them: use criterion element1 "
                "(the paper's default) or vector, or strategy: ddp"
            )
        what = self._own_passes(on_gathered_model_only=True)
        if what is not None:
            raise PrunerError(
                f"{what} is not supported under ModelParallelStrategy (FSDP2): it would run forward/backward "
                "passes on the gathered, unsharded model on every rank; use attention_selection: score (or obs) "
                "and iterative_steps: 1, or strategy: ddp"
            )

    def _resolve_calibration_batches(self, trainer: pl.Trainer) -> int:
        n = self.calibration_batches
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
        if self.prune_at_step is not None and self.prune_at_step < n:
            raise PrunerError(
                f"`StructuralPruneCallback(prune_at_step={self.prune_at_step})` comes before the {n} calibration "
                f"batches end: use prune_at_step >= {n}"
            )
        return n

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finds the model and, unless resumed after pruning, checks it and discovers its
        structure; all before the first calibration batch."""
        from pruner.io import find_causal_lm

        if self._pruned:  # resumed: the structure was rebuilt before the weights loaded
            self.model_path = self.model_path if self.model_path is not None else \
                find_causal_lm(pl_module, self.model_attribute)[0]
            return
        path, model = find_causal_lm(pl_module, self.model_attribute)
        self.model_path = path
        self._check_model(trainer, pl_module, model)
        self._inspect_dense_model(trainer, model)
        self._measure(trainer, pl_module, "dense")

    def _check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        from peft import PeftModel

        from pruner.recovery import has_lora
        from pruner.recovery.lora import missing_targets

        if has_lora(model) or any(isinstance(m, PeftModel) for m in pl_module.modules()):
            raise PrunerError(
                f"{type(model).__name__} already has LoRA/peft adapters before pruning: prune the dense model "
                "(with CausalLMModule, set model.attach_lora_at_start: false); StructuralPruneCallback attaches "
                "LoRA itself after pruning (attach_lora: true)"
            )
        if self._sharded and is_fsdp_module(pl_module):
            raise PrunerError(
                f"fully_shard was applied to the LightningModule {type(pl_module).__name__} itself: shard the "
                f"causal LM instead (each decoder layer, then the model at {self.model_path!r}), which "
                "StructuralPruneCallback can gather, prune and shard again"
            )
        if self.attach_lora and (gone := missing_targets(model, self.lora.target_modules)):
            raise PrunerError(
                f"LoRA target(s) {gone} match no linear layer of {type(model).__name__}: set lora_target_modules "
                "to names of its projections (e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj]), or attach_lora: false"
            )
        if trainer.max_steps != -1 and trainer.max_steps < self._prune_at and trainer.accumulate_grad_batches == 1:
            rank_zero_warn(
                f"trainer.max_steps={trainer.max_steps} ends fit before the prune step ({self._prune_at} batches):"
                " the model will not be pruned; Lightning counts calibration batches as steps"
            )
        if self.export_dir is not None and trainer.is_global_zero:
            self._check_export_space(model)

    def _check_loader_length(self, trainer: pl.Trainer) -> None:
        """The loaders exist from here on (Lightning builds them after ``on_fit_start``): refuse a
        first epoch that ends before the prune step, rather than a fit that silently never prunes."""
        total = trainer.num_training_batches
        if not self._pruned and isinstance(total, int) and total < self._prune_at:
            raise PrunerError(
                f"the train loader has {total} batches per epoch, fewer than the {self._prune_at} batches before "
                "pruning (the first epoch holds them all): add recovery data or lower calibration_batches/prune_at_step"
            )

    def _check_export_space(self, model: nn.Module) -> None:
        """The export needs at most the dense model's bytes: refuse now rather than after recovery."""
        from pruner.checks import existing_ancestor

        existing = existing_ancestor(self.export_dir)
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(existing).free
        if free < need:
            raise PrunerError(f"the export needs up to {need / 2**20:,.0f} MiB but {existing} has {free / 2**20:,.0f} "
                              "MiB free: free some space or choose another export_dir")

    def _inspect_dense_model(self, trainer: pl.Trainer, model: nn.Module) -> None:
        from pruner.structure import discover
        from pruner.structure import count_parameters
        from pruner.structure import model_fingerprint

        if self._sharded:  # discovery probes layers with real tensors: work on a gathered copy
            from pruner.distributed.gather import unsharded_copy

            model = unsharded_copy(model)
        self._structure = discover(model, seed=self.config.seed)
        self.config.check_model(len(self._structure.layers))
        self._total_before = count_parameters(model)
        self._fingerprint = model_fingerprint(model)

    # ------------------------------------------------------------------ calibration

    def _own_passes(self, on_gathered_model_only: bool = False) -> str | None:
        """The setting that makes this callback run the calibration batches again itself after
        calibration (None if none): the measured attention choice and later iterative steps, on the
        model as pruned so far (under FSDP2 a gathered copy), or, unless ``on_gathered_model_only``,
        obs-fisher's backward passes where there is no refit text (run before any gather)."""
        cfg = self.config
        if cfg.measures_attention:
            return "attention_selection='measured'"
        if cfg.iterative_steps > 1:
            return f"iterative_steps={cfg.iterative_steps}"
        if not on_gathered_model_only and cfg.mlp_selection == "obs-fisher" and not self._reconstruction_batches:
            return "mlp_selection='obs-fisher' without reconstruction text"
        return None

    @property
    def _keeps_inputs(self) -> bool:
        return self._own_passes() is not None

    @property
    def _prune_at(self) -> int:
        return self.prune_at_step if self.prune_at_step is not None else self._num_calibration

    def _in_calibration(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.current_epoch == 0 and self._prune_at - self._num_calibration <= batch_idx < self._prune_at

    def model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The causal LM this callback prunes, read from its attribute path in ``pl_module``."""
        return pl_module.get_submodule(self.model_path) if self.model_path else pl_module

    def _calibration_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        from pruner.batches import check_inputs

        if self._estimator is None:
            self._start_calibration(trainer, pl_module)
        model = self.model(pl_module)
        inputs = model_inputs(batch)
        if inputs is not None:
            check_inputs(inputs, model.config, f"calibration batch {self._calibrated_batches}")
            self._tokens_per_sample = int(inputs["input_ids"].shape[-1])
        elif self._keeps_inputs:
            raise PrunerError(
                f"{self._own_passes()} runs the calibration batches again itself, which needs dict batches holding 'input_ids' (and "
                f"optionally 'attention_mask', 'labels'); got {type(batch).__name__}"
            )
        if self._keeps_inputs:  # kept (a few KB) for the measured choice / later iterative steps
            self._calibration_inputs.append(inputs)
        model.eval()  # no dropout in importance (as pruner.prune); Lightning may re-enable it
        self._estimator.begin_batch(batch_samples(batch))
        self._calibrated_batches += 1

    def _start_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pruner.loop import families_for
        from pruner.importance import ImportanceEstimator

        unwrap_ddp(trainer)
        self._paused = PausedOptimizers(trainer.optimizers)
        model = self.model(pl_module)
        est = ImportanceEstimator(model, families_for(self._structure, self.config), self.config.criterion,
                                  self.config.seed, sharded=self._sharded)
        if "importance" in self._pending:  # resumed in the middle of calibration
            if self._sharded:
                raise PrunerError("resuming in the middle of calibration is not supported under ModelParallelStrategy "
                                  "(FSDP2): restart the fit, or calibrate with strategy: ddp")
            est.load_state({k: v.to(pl_module.device) for k, v in self._pending.pop("importance").items()})
        est.attach()
        self._estimator = est
        self._reconstruction_batches = self._datamodule_reconstruction(trainer)
        if self.config.regional_epochs and not self._reconstruction_batches:
            raise PrunerError("StructuralPruneCallback(regional_epochs=...): the datamodule's reconstruction_batches() "
                              "gave no batch on this rank: give it text (data.reconstruction_source), or set "
                              "regional_epochs: 0")
        if self.config.reconstruct and not self._reconstruction_batches:  # the calibration batches feed the refit
            from pruner.refit import consumers, GramCollector

            self._collector = GramCollector(model, consumers(self._structure, self.config))
            if "grams" in self._pending:
                self._collector.grams = {k: v.to(pl_module.device) for k, v in self._pending.pop("grams").items()}
                self._collector.tokens = dict(self._pending.pop("gram_tokens", {}))
            self._collector.attach()

    def _set_recording(self, on: bool) -> None:
        for recorder in (self._estimator, self._collector):
            if recorder is not None:
                recorder.attach() if on else recorder.detach()

    def _stop_calibration(self) -> None:
        self._set_recording(False)
        if self._paused is not None:
            self._paused.resume()
            self._paused = None

    def _datamodule_reconstruction(self, trainer: pl.Trainer) -> list[torch.Tensor]:
        """This rank's refit text from ``datamodule.reconstruction_batches()`` (input_ids
        batches; the same count on every rank under FSDP2), or [] to refit on calibration."""
        make = getattr(trainer.datamodule, "reconstruction_batches", None) if self.config.reconstruct else None
        return list(make()) if callable(make) else []

    # ------------------------------------------------------------------ the prune step

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pruner.io.models import replace_submodule
        from pruner.loop import finish_plan, prune_steps, StepHooks

        if self._estimator is None:
            raise PrunerError("no calibration batch was seen before the prune step")
        est = self._estimator
        self._stop_calibration()
        pl_module.zero_grad(set_to_none=True)
        model = self.model(pl_module)
        collector = self._collector
        if self._reconstruction_batches:  # before the FSDP2 gather: every rank runs its share
            collector = self._collect_reconstruction(model, self._structure)
        if collector is not None and self.config.mlp_selection == "obs-fisher":
            self._collect_fisher(trainer, model, collector)
        est.load_state(self._reduced_importance(trainer, est.state()))
        vectors = est.vectors()
        if self._sharded:  # every rank scored only its own shards: the sum is the full score
            vectors = all_reduce_dict(trainer.strategy, vectors)
        self.vectors = vectors  # per-index saliences, summed over ranks (small: no model-sized tensor)
        if self._sharded:  # gather the shards into an ordinary CPU model; sharded again below
            from pruner.distributed.gather import unsharded_copy

            model = unsharded_copy(model)
        if collector is not None:
            collector = self._reduced_grams(trainer, collector, model)
        hooks = StepHooks(estimate=lambda m, s, c: self._estimate_on(trainer, m, s, c),
                          refine_batches=self._kept_batches(model),
                          all_reduce=lambda t: trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu(),
                          check=lambda plan, structure: self._check_step_plan(trainer, plan, structure),
                          before_surgery=lambda dense: self._keep_teacher(pl_module, dense),
                          regional_batches=self._regional_batches(model))
        plan = prune_steps(model, self._structure, self.config, hooks, first=(vectors, collector))
        calibration = {"batches": self._calibrated_batches * trainer.world_size, "samples": est.num_samples,
                       "tokens_per_sample": self._tokens_per_sample, "world_size": trainer.world_size}
        if self._reconstruction_batches:
            calibration["reconstruction_tokens"] = trainer.world_size * sum(b.numel() for b in
                                                                            self._reconstruction_batches)
        self.plan = finish_plan(plan, model, self._structure, self._fingerprint, self._total_before, self.config,
                                calibration)
        self._pruned, self._estimator, self._collector = True, None, None
        self._calibration_inputs, self._reconstruction_batches = [], []
        model.train()
        if self._sharded:
            from pruner.distributed.gather import build_skeleton

            self._pruned_skeleton = build_skeleton(model)
        else:
            self._measure(trainer, pl_module, "pruned")
        self._attach_lora(model)
        if self._sharded:
            replace_submodule(pl_module, self.model_path, model)
            self._shard(pl_module, model)
            trainer.strategy.model_to_device()
            self._measure(trainer, pl_module, "pruned")
        rebuild_training(trainer)
        if self.verbose:
            p = self.plan.params
            rank_zero_info(
                f"StructuralPruneCallback: pruned at batch {self._prune_at}: {p['before']:,} -> {p['after']:,} "
                f"parameters ({p['removed_fraction']:.1%} removed); trainable now "
                f"{sum(q.numel() for q in pl_module.parameters() if q.requires_grad):,}"
            )
            fit = self.plan.calibration.get("regional")
            if fit and fit["layers"]:
                before, after = (sum(fit[k]) / len(fit[k]) for k in ("error_before", "error_after"))
                rank_zero_info(f"StructuralPruneCallback: regional fit of {len(fit['layers'])} MLPs: mean relative "
                               f"error {before:.4f} -> {after:.4f} in {fit['seconds']:.0f} s")

    def _reduced_importance(self, trainer: pl.Trainer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The estimator's accumulators summed over ranks, corrected for Lightning's
        ``1/accumulate_grad_batches`` loss scaling. Under FSDP2 the gradient sums are rank-local
        shards: they are not summed (each rank scores its own rows)."""
        local = {k: v for k, v in state.items() if self._sharded and k.startswith("grad::")}
        out = all_reduce_dict(trainer.strategy, {k: v.float() for k, v in state.items() if k not in local})
        out.update(local)
        scale = float(trainer.accumulate_grad_batches)
        if scale != 1.0:
            for k in out:
                if k.startswith("grad::"):
                    out[k] = out[k] * scale
                elif k.startswith("fisher::"):
                    out[k] = out[k] * scale**2
        return out

    @staticmethod
    def _reduced_grams(trainer: pl.Trainer, local, model: nn.Module):
        """``local``'s input statistics summed over ranks (fp64), as a collector for ``model``
        (the module the refit changes: under FSDP2 the gathered copy)."""
        from pruner.refit import GramCollector

        names = [n for n in local.names if n in local.grams]
        fisher = [n for n in names if n in local.fisher]  # obs-fisher's output statistics
        out = GramCollector(model, names, local.output_modules)
        out.outputs = local.outputs  # regional_epochs: this rank's dense layer outputs, on its own text
        if names:  # (the same on every rank: nothing the plan prunes was reached otherwise)
            def count(n: int, like: torch.Tensor) -> torch.Tensor:
                return torch.tensor(float(n), dtype=torch.float64, device=like.device)

            tensors = {f"g::{n}": local.grams[n] for n in names}
            tensors.update({f"t::{n}": count(local.tokens[n], local.grams[n]) for n in names})
            tensors.update({f"f::{n}": local.fisher[n] for n in fisher})
            tensors.update({f"ft::{n}": count(local.fisher_tokens[n], local.fisher[n]) for n in fisher})
            summed = all_reduce_dict(trainer.strategy, tensors)
            device = next(model.parameters()).device
            out.grams = {n: summed[f"g::{n}"].to(device) for n in names}
            out.tokens = {n: int(summed[f"t::{n}"]) for n in names}
            out.fisher = {n: summed[f"f::{n}"].to(device) for n in fisher}
            out.fisher_tokens = {n: int(summed[f"ft::{n}"]) for n in fisher}
        return out

    def _collect_reconstruction(self, model: nn.Module, structure):
        """The refit's statistics of ``model`` from forward passes over this rank's
        reconstruction batches (under FSDP2 through the sharded model's own hooks)."""
        from pruner.refit import collect_inputs
        from pruner.refit import consumers, GramCollector

        from pruner.refit import target_modules

        outputs = target_modules(structure, self.config) if self.config.regional_epochs else None
        collector = GramCollector(model, consumers(structure, self.config), outputs)
        collect_inputs(model, self._reconstruction_batches, collector, stop_early=not self._sharded)
        return collector

    def _collect_fisher(self, trainer: pl.Trainer, model: nn.Module, collector) -> None:
        """obs-fisher: this rank's share of ``fisher_samples`` run backward, from its refit text
        (or its kept calibration batches), into ``collector.fisher`` (summed over ranks later)."""
        from pruner.refit import collect_output_fisher

        text = self._reconstruction_batches or self._kept_batches(model)
        collect_output_fisher(model, text, collector, -(-self.config.fisher_samples // trainer.world_size))

    def _regional_batches(self, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        """regional_epochs: this rank's refit text on ``model``'s device, in the order its statistics ran."""
        if not self.config.regional_epochs:
            return []
        device = next(model.parameters()).device
        return [{"input_ids": b.to(device)} for b in self._reconstruction_batches]

    def _kept_batches(self, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        return [{k: v.to(device) for k, v in b.items()} for b in self._calibration_inputs]

    def _estimate_on(self, trainer: pl.Trainer, model: nn.Module, structure, cfg: PruneConfig):
        """Steps 2..N: importance of the partly pruned ``model`` on this rank's kept calibration
        batches, summed over ranks, and with ``reconstruct`` the refit's statistics of it."""
        from pruner.loop import estimate_importance
        from pruner.refit import consumers, GramCollector

        collector = None
        if cfg.reconstruct and not self._reconstruction_batches:  # statistics from the calibration batches
            collector = GramCollector(model, consumers(structure, cfg))
        vectors = estimate_importance(model, self._kept_batches(model), structure, cfg, collector=collector,
                                      reduce=lambda state: all_reduce_dict(trainer.strategy, state))
        if cfg.reconstruct and self._reconstruction_batches:  # the partly pruned model on the refit text
            collector = self._collect_reconstruction(model, structure)
        if collector is not None and cfg.mlp_selection == "obs-fisher":
            self._collect_fisher(trainer, model, collector)
        if collector is not None:
            collector = self._reduced_grams(trainer, collector, model)
        return vectors, collector

    def _check_step_plan(self, trainer: pl.Trainer, plan, structure) -> None:
        """Before a step's weights change: every rank chose this plan, and LoRA targets survive it."""
        from pruner.recovery.lora import missing_targets

        check_ranks_agree(trainer, plan)
        if not self.attach_lora:
            return
        removed = [structure.layers[lp.index].path for lp in plan.layers if lp.removed]
        model = trainer.lightning_module if self._sharded else self.model(trainer.lightning_module)
        gone = missing_targets(model, self.lora.target_modules, removed) if removed else []
        if gone:
            raise PrunerError(
                f"LoRA target(s) {gone} exist only in layers the plan removes ({removed}): target module "
                "names without a layer index (e.g. q_proj), or keep those layers out of `layers`"
            )

    @staticmethod
    def _keep_teacher(pl_module: pl.LightningModule, dense: nn.Module) -> None:
        keep = getattr(pl_module, "keep_teacher", None)
        if getattr(pl_module, "wants_teacher", False) and callable(keep) and getattr(pl_module, "teacher", None) is None:
            keep(dense)  # distillation: the dense model, frozen, before surgery

    def _attach_lora(self, model: nn.Module) -> None:
        if not self.attach_lora:
            return
        from pruner.recovery import attach_lora

        # seeded adapters: the same on every rank and world size, whatever ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            attach_lora(model, self.lora)
        self._lora_attached = True

    def _shard(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """FSDP2: the module's own ``shard_model()`` if it has one, else per layer + root."""
        shard = getattr(pl_module, "shard_model", None)
        if callable(shard):
            shard()
            return
        from pruner.structure import find_layer_stack

        shard_causal_lm(model, find_layer_stack(model)[0], data_parallel_mesh(pl_module))

    # ------------------------------------------------------------------ measuring and export

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """Validation perplexity of the model now (every rank computes the same), on the
        datamodule's validation batches when they are dicts holding ``input_ids``."""
        dm = trainer.datamodule
        if not self.report_perplexity or dm is None or not callable(getattr(dm, "val_dataloader", None)):
            return
        loader = dm.val_dataloader()
        if not loader:
            return
        first = next(iter(loader), None)
        if not isinstance(first, dict) or not torch.is_tensor(first.get("input_ids")):
            if when == "dense":
                rank_zero_info("StructuralPruneCallback: the validation batches are not dicts holding 'input_ids': "
                               "no perplexity report (report_perplexity: false silences this)")
            return
        from pruner.eval.perplexity import loader_perplexity

        # FSDP2: the root of the sharding is the model itself, whose hooks gather its weights
        self.perplexity[when] = loader_perplexity(self.model(pl_module), loader, pl_module.device)
        if self.verbose:
            rank_zero_info(f"StructuralPruneCallback: validation perplexity ({when}): {self.perplexity[when]:.2f}")

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruned:
            rank_zero_warn(
                f"StructuralPruneCallback: fit ended before the prune step ({self._prune_at} train batches); the "
                "model was not pruned and nothing was exported. Raise trainer.max_steps"
            )
            return
        if self.export_dir is None:
            return
        from pruner.io import save_pretrained
        from pruner.recovery import has_lora, merge_lora

        self._measure(trainer, pl_module, "recovered")
        if self._sharded:
            model = self._gather_for_export(trainer, pl_module)
        else:
            model = self.model(pl_module)
            if has_lora(model):
                merge_lora(model)  # on every rank: the modules stay identical
        folder = Path(self.export_dir).expanduser().absolute()
        if trainer.is_global_zero:
            report = pruning_report(self.plan, self.perplexity, trainer.global_step - self._prune_at)
            save_pretrained(model, folder, tokenizer=self._export_tokenizer(trainer, pl_module), plan=self.plan,
                            overwrite=self.overwrite_export, extra_files={"report.md": report})
        trainer.strategy.barrier("pruner-export")
        self.export_path = folder
        if self.verbose:
            rank_zero_info(f"StructuralPruneCallback: exported the pruned model to {self.export_path}")

    def _export_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if isinstance(self.tokenizer, (str, Path)):
            from pruner.io import load_tokenizer

            return load_tokenizer(str(self.tokenizer))
        if self.tokenizer is not None:
            return self.tokenizer
        for owner in (pl_module, trainer.datamodule):
            tok = getattr(owner, "tokenizer", None)
            if tok is not None and callable(getattr(tok, "save_pretrained", None)):
                return tok
        return None

    def _gather_for_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """FSDP2: the trained shards gathered into an ordinary pruned model with LoRA merged, on
        rank 0 only (the other ranks join the gathers and return None)."""
        from pruner.recovery import attach_lora, merge_lora
        from pruner.distributed.gather import full_state_dict, materialize, skeleton_from

        sharded = self.model(pl_module)
        state = full_state_dict(sharded, keep=trainer.is_global_zero)
        if not trainer.is_global_zero:
            return None
        skeleton = skeleton_from(*self._pruned_skeleton)
        if self._lora_attached:
            attach_lora(skeleton, self.lora)  # the same parameter names as the trained model
        model = materialize(skeleton, state, sharded)
        if self._lora_attached:
            merge_lora(model)
        return model

    # ------------------------------------------------------------------ resume

    def _settings(self) -> dict[str, Any]:
        """What a resumed fit must share with the checkpoint (JSON-normalised)."""
        settings = {**self.config.to_dict(), "attach_lora": self.attach_lora, "lora": asdict(self.lora),
                    "calibration_batches": self.calibration_batches, "prune_at_step": self.prune_at_step}
        return json.loads(json.dumps(settings))

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise PrunerError(f"the checkpoint's StructuralPruneCallback state has version {state.get('version')!r}, "
                              f"this pruner writes {STATE_VERSION}: resume with the pruner version that wrote it, or "
                              "start the fit again")
        theirs, ours = json.loads(json.dumps(state.get("settings", {}))), self._settings()
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if differ:
            listed = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, callback {ours.get(k)!r}" for k in differ)
            raise PrunerError(f"the checkpoint was written with other pruning settings ({listed}): resume with the "
                              "same StructuralPruneCallback settings, or start a new fit without ckpt_path")

    def _install_resume_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning loads the module's weights before any callback state; the pruned (+ LoRA)
        structure must exist by then. The module's ``on_load_checkpoint`` (called just before
        the weights load) is wrapped, for this fit only, to rebuild it first."""
        self._remove_resume_hook(pl_module)
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key)
            if state is not None:
                self._check_resumable(state)
                if state.get("pruned") and self._sharded:
                    raise PrunerError(
                        "resuming a pruned fit under ModelParallelStrategy (FSDP2) is not supported: resume it with "
                        "strategy: ddp (or one device), or fine-tune the exported pruned folder with FSDP2")
                self._rebuild(pl_module, state)
            original(checkpoint)

        on_load_checkpoint.pruner_resume_hook = True
        pl_module.on_load_checkpoint = on_load_checkpoint

    @staticmethod
    def _remove_resume_hook(pl_module: pl.LightningModule) -> None:
        hook = vars(pl_module).get("on_load_checkpoint")
        if getattr(hook, "pruner_resume_hook", False):
            del pl_module.on_load_checkpoint

    def _rebuild(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """The checkpoint's structure on the freshly built dense model: the plan applied, LoRA
        attached (its values come from the checkpoint). A distilling module gets its teacher
        first, from the freshly built dense model: the calibration batches move no weight, so it
        is the model the interrupted fit kept just before surgery."""
        if state.get("pruned"):
            self._keep_teacher(pl_module, _checkpointed_model(pl_module, state))
        rebuild_structure(pl_module, state, self.lora)


def _checkpointed_model(pl_module: nn.Module, state: dict[str, Any]) -> nn.Module:
    """The causal LM a callback state's plan applies to, inside ``pl_module``."""
    from pruner.io import find_causal_lm

    path = state.get("model_path")
    if path is None:
        return find_causal_lm(pl_module)[1]
    return pl_module.get_submodule(path) if path else pl_module


def rebuild_structure(pl_module: nn.Module, state: dict[str, Any], lora: LoraSettings | None = None) -> None:
    """Applies a callback state's plan (and LoRA) to the dense causal LM inside ``pl_module``."""
    from pruner.recovery import attach_lora, has_lora
    from pruner.structure import Plan
    from pruner.structure import apply_plan

    if not state.get("pruned"):
        return
    model = _checkpointed_model(pl_module, state)
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
    from pruner.io import read_checkpoint

    checkpoint_path = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint dict"
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    states = [s for k, s in (checkpoint.get("callbacks") or {}).items() if k.startswith("StructuralPruneCallback")]
    if not states:
        raise PrunerError(f"{checkpoint_path} holds no StructuralPruneCallback state: it was not written by a pruning "
                          "fit; load it with the module's own load_from_checkpoint")
    pl_module.configure_model()  # modules that build their model there (Lightning calls it in fit too)
    rebuild_structure(pl_module, states[0])
    pl_module.on_load_checkpoint(checkpoint)
    pl_module.load_state_dict(checkpoint["state_dict"])
    return pl_module
