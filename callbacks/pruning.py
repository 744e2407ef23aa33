"""``StructuralPruneCallback``: LLM-Pruner inside ``Trainer.fit``: calibrate, prune, recover.

The callback only decides *when*; the core (``pruner.*``) decides *what*:

1. the first ``calibration_batches`` train batches (``PruneDataModule`` puts its calibration
   windows there) run forward + backward with NO optimizer step (``module.calibrating``);
   ``pruner.importance.ImportanceEstimator`` hooks consume the gradients as they arrive;
2. after the last of them: the accumulators are summed across ranks (one all-reduce), the
   plan is selected (deterministic, so every rank computes the same one; checked by hash),
   applied in place with ``pruner.apply_plan`` and recorded in ``module.pruning_plan`` (so
   checkpoints rebuild the pruned structure); LoRA is attached, the optimizer and, under DDP,
   the ``DistributedDataParallel`` wrapper are rebuilt for the new parameters;
3. the remaining batches are ordinary recovery steps;
4. at the end of fit, with ``export_dir``: LoRA is merged and the model is exported with
   ``pruner.save_pretrained`` (weights, config, tokenizer, ``plan.json``).

Example (a tiny random LLaMA, a few seconds on a CPU):
    >>> import tempfile, lightning as L
    >>> from pruner.callbacks import StructuralPruneCallback
    >>> from pruner.lightning_modules.causal_lm import CausalLMModule
    >>> from pruner.lightning_modules.data import PruneDataModule
    >>> from pruner.lightning_modules.testing import save_tiny_llama
    >>> folder = save_tiny_llama(tempfile.mkdtemp())
    >>> prune = StructuralPruneCallback(pruning_ratio=0.5, verbose=False)
    >>> trainer = L.Trainer(accelerator="cpu", max_steps=6, callbacks=[prune], logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.fit(CausalLMModule(str(folder)), PruneDataModule(calibration_samples=4,
    ...                                                          calibration_seq_len=16))
    >>> prune.plan.params["after"] < prune.plan.params["before"]
    True

YAML (``python -m pruner fit --config ...``)::

    trainer:
      callbacks:
        - class_path: pruner.callbacks.StructuralPruneCallback
          init_args: {target_sparsity: 0.2, attention_layers: [4, 28], mlp_layers: [4, 28]}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pruner.config import PruneConfig
from pruner.errors import PrunerError

REPORT_SETTINGS = ("criterion", "aggregation", "mode", "target_sparsity", "pruning_ratio", "global_ranking",
                   "head_granularity", "prune_attention", "prune_mlp", "attention_selection", "mlp_selection",
                   "reconstruct", "reconstruct_damping")  # the plan settings report.md lists


class StructuralPruneCallback(pl.Callback):
    """Prunes the model of a ``CausalLMModule`` during ``fit`` after calibration batches.

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
        head_granularity: query (query heads evenly inside each KV group) or kv (whole groups).
        prune_attention: block mode: prune attention heads.
        prune_mlp: block mode: prune MLP channels.
        global_ranking: rank groups across layers by score per parameter.
        max_layer_ratio: global ranking: at most this fraction of a layer's groups goes.
        attention_selection: which heads / KV groups a layer loses: score (the paper),
            measured (calibration loss with them masked, on the calibration batches this
            callback keeps; helps local allocation, hurt global on SmolLM2: see the README) or
            obs (block Optimal Brain Surgeon on the refit's statistics; needs reconstruct).
        round_to: kept MLP/hidden widths become multiples of this.
        iterative_steps: prune in N steps. Step 1 uses the importance of the calibration
            batches of the fit; steps 2..N re-estimate it on the same batches (kept by the
            callback, a few KB) on the partly pruned model, as ``pruner.prune`` does.
        reconstruct: refit the kept input columns of o_proj / down_proj by ridge least squares
            so that each pruned layer reproduces the dense layer's output (no training). The
            input statistics (one in_features² fp64 matrix per pruned layer and module, summed
            over ranks) come from the datamodule's ``reconstruction_batches()`` when it has
            any (``PruneDataModule(reconstruction_source=...)``: forward passes at the prune
            step), else from the calibration batches (only ten on the paper's budget: the
            refit then needs ``reconstruct_damping`` about 0.1; see the README).
        reconstruct_damping: the refit's ridge term, relative to the mean input energy.
        mlp_selection: which MLP channels a layer loses: score (the paper) or obs (greedy
            Optimal Brain Surgeon on the refit's statistics; needs reconstruct).
        seed: seed of the random criterion and of structure probing.

    Callback options:

    Args:
        calibration_batches: train batches (per rank) that feed importance; None = the
            datamodule's ``calibration_batches`` (``PruneDataModule``: calibration windows).
        prune_at_step: prune after this many train batches of the first epoch; calibration
            covers the ``calibration_batches`` batches just before it and earlier batches are
            ordinary (dense) training steps. None = right after the calibration batches.
        attach_lora: attach LoRA (``module.attach_lora()``) after pruning; False = fine-tune
            every weight of the pruned model.
        export_dir: at the end of fit, merge LoRA and export the pruned model here (a folder
            for ``pruner.load_pretrained``); None = no export.
        overwrite_export: replace an existing non-empty ``export_dir``.
        report_perplexity: measure perplexity on the datamodule's validation data before
            pruning, right after it and after recovery (three passes over it; set
            ``data.val_max_windows`` to bound them); the figures go into ``report.md`` in the
            export and ``callback.perplexity``. Skipped when there is no validation data.
        verbose: log parameter counts and the export path (rank 0).

    Notes:
        * Strategies: single device, DDP and ``ModelParallelStrategy`` (FSDP2, data parallel).
          Under DDP, calibration runs on the bare module (each rank sums its own gradients; one
          all-reduce at the prune step) and the ``DistributedDataParallel`` wrapper is rebuilt
          for the pruned + LoRA parameters. Under FSDP2 each rank keeps running sums of its own
          gradient *shards* and turns them into partial per-index score vectors; one all-reduce
          of those vectors gives the exact scores, without gathering a gradient. At the prune
          step the weights are gathered into an ordinary copy (on CPU, every rank: the one time
          the whole model is held per rank), pruned, given LoRA and sharded again with
          ``module.shard_model()``; the export gathers the trained shards on rank 0 and merges
          LoRA there (the running model stays sharded, adapters unmerged). FSDP2 supports the
          gradient-sum criteria (element1, vector) and the gradient-free ones, not element2/mix
          (they need per-sample gradients, FSDP averages over ranks) or measured attention
          selection; resuming a pruning fit from a checkpoint needs single device or DDP.
        * ``trainer.accumulate_grad_batches``: Lightning divides each loss by it; the
          accumulators are rescaled, so importance does not depend on it. The first optimizer
          step after pruning sees only the recovery micro-batches left in its accumulation
          window (e.g. 6 of 16 after 10 calibration batches).
        * Resuming (``ckpt_path``): the callback state holds the plan (``CausalLMModule``
          re-applies it before loading the weights) or, for a checkpoint written during
          calibration, the importance accumulators, so that either resumes exactly.
        * A checkpoint holds the LoRA-wrapped pruned model; the export holds the merged one.
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
        head_granularity: Literal["query", "kv"] = "query",
        prune_attention: bool = True,
        prune_mlp: bool = True,
        global_ranking: bool = False,
        max_layer_ratio: float = 0.9,
        attention_selection: Literal["score", "measured", "obs"] = "score",
        round_to: int = 1,
        iterative_steps: int = 1,
        reconstruct: bool = False,
        reconstruct_damping: float = 0.1,
        mlp_selection: Literal["score", "obs"] = "score",
        seed: int = 0,
        calibration_batches: int | None = None,
        prune_at_step: int | None = None,
        attach_lora: bool = True,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        report_perplexity: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        # PruneConfig checks every pruning option with its own exact messages.
        self.config = PruneConfig(
            criterion=criterion, aggregation=aggregation, mode=mode, target_sparsity=target_sparsity,
            pruning_ratio=pruning_ratio, attention_layers=attention_layers, mlp_layers=mlp_layers,
            layers=layers, head_granularity=head_granularity, prune_attention=prune_attention,
            prune_mlp=prune_mlp, global_ranking=global_ranking, max_layer_ratio=max_layer_ratio,
            round_to=round_to, iterative_steps=iterative_steps, seed=seed, attention_selection=attention_selection,
            reconstruct=reconstruct, reconstruct_damping=reconstruct_damping, mlp_selection=mlp_selection,
        )
        if calibration_batches is not None and (not isinstance(calibration_batches, int) or calibration_batches < 1):
            raise PrunerError(
                f"`StructuralPruneCallback(calibration_batches={calibration_batches!r})` must be an integer "
                ">= 1, or None to take the datamodule's calibration_batches"
            )
        if prune_at_step is not None and (not isinstance(prune_at_step, int) or prune_at_step < 1):
            raise PrunerError(
                f"`StructuralPruneCallback(prune_at_step={prune_at_step!r})` must be an integer >= 1 "
                "(train batches before pruning), or None to prune right after the calibration batches"
            )
        if calibration_batches is not None and prune_at_step is not None and prune_at_step < calibration_batches:
            raise PrunerError(
                f"`StructuralPruneCallback(prune_at_step={prune_at_step})` comes before the "
                f"{calibration_batches} calibration batches end: use prune_at_step >= calibration_batches"
            )
        if export_dir is not None and not str(export_dir).strip():
            raise PrunerError("`StructuralPruneCallback(export_dir='')` is empty: give a folder or None")
        self.calibration_batches = calibration_batches
        self.prune_at_step = prune_at_step
        self.attach_lora = attach_lora
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.report_perplexity = report_perplexity
        self.verbose = verbose
        self.perplexity: dict[str, float] = {}  # "dense", "pruned", "recovered" on the validation data
        self.plan = None  # pruner.plan.Plan once pruned (also after resuming)
        self.vectors: dict | None = None  # the importance vectors the plan was selected from
        self.export_path: Path | None = None  # the folder written at the end of fit
        self._pruned = False
        self._estimator = None
        self._collector = None  # GramCollector (reconstruct): fed by calibration, or at the prune step by refit text
        self._pending_grams: dict | None = None  # from a mid-calibration checkpoint
        self._structure = None
        self._fingerprint = ""
        self._total_before = 0
        self._calibrated_batches = 0
        self._tokens_per_sample = 0
        self._pending_importance: dict[str, torch.Tensor] | None = None  # from a mid-calibration checkpoint
        self._calibration_inputs: list[dict[str, torch.Tensor]] = []
        self._reconstruction_batches: list[torch.Tensor] = []  # this rank's refit text (datamodule)
        self._sharded = False  # ModelParallelStrategy (FSDP2): see _prune_sharded
        self._pruned_skeleton = None  # (class, config, shapes) of the pruned model, for the FSDP2 export

    # ------------------------------------------------------------------ hooks (thin)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_setup(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruned:
            self._inspect_dense_model(trainer, pl_module)
            self._measure(trainer, pl_module, "dense")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._pruned and self._in_calibration(trainer, batch_idx):
            self._calibration_batch(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._sharded and self._estimator is not None and self._in_calibration(trainer, batch_idx):
            self._estimator.accumulate_gradients(trainer.world_size)  # FSDP2: read this backward's shards
        if not self._pruned and trainer.current_epoch == 0 and batch_idx == self._prune_at - 1:
            self._prune(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for recorder in (self._estimator, self._collector):  # validation must not feed calibration
            if recorder is not None:
                recorder.detach()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for recorder in (self._estimator, self._collector):
            if recorder is not None:
                recorder.attach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for recorder in (self._estimator, self._collector):  # restore requires_grad flags, remove hooks
            if recorder is not None:
                recorder.detach()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pruned": self._pruned, "plan": self.plan.to_dict() if self.plan else None,
                                 "calibrated_batches": self._calibrated_batches, "perplexity": dict(self.perplexity)}
        if self._estimator is not None:  # a checkpoint in the middle of calibration
            state["importance"] = {k: v.detach().cpu() for k, v in self._estimator.state().items()}
            state["calibration_inputs"] = self._calibration_inputs
        if self._collector is not None:  # exact resume of the refit's statistics (fp64, in_features² each)
            state["grams"] = {k: v.detach().cpu() for k, v in self._collector.grams.items()}
            state["gram_tokens"] = dict(self._collector.tokens)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from pruner.plan import Plan

        self._pruned = bool(state_dict.get("pruned", False))
        self.plan = Plan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self._calibrated_batches = int(state_dict.get("calibrated_batches", 0))
        self._pending_importance = state_dict.get("importance")
        self.perplexity = dict(state_dict.get("perplexity", {}))
        self._calibration_inputs = list(state_dict.get("calibration_inputs", []))
        if "grams" in state_dict:
            self._pending_grams = {"grams": state_dict["grams"], "tokens": state_dict.get("gram_tokens", {})}

    # ------------------------------------------------------------------ steps

    def _check_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        for attr in ("hf_model", "calibrating", "attach_lora", "pruning_plan"):
            if not hasattr(type(module), attr) and not hasattr(module, attr):
                raise PrunerError(
                    f"StructuralPruneCallback needs a CausalLMModule-like LightningModule (missing `{attr}`); "
                    f"got {type(module).__name__}: use pruner.lightning_modules.causal_lm.CausalLMModule"
                )
        strategy = trainer.strategy
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if self._sharded:
            self._check_sharded_setup(module)
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
        if self.attach_lora and hasattr(module, "missing_lora_targets") and (gone := module.missing_lora_targets()):
            raise PrunerError(
                f"LoRA target(s) {gone} match no module of {type(module.hf_model).__name__}: set "
                "model.lora_target_modules to names of its linear layers (e.g. [q_proj, k_proj, v_proj, o_proj, "
                "gate_proj, up_proj, down_proj]), or attach_lora: false"
            )
        dm_hparams = getattr(trainer.datamodule, "hparams", None) or {}
        if dm_hparams.get("reconstruction_source") and not self.config.reconstruct:
            raise PrunerError(
                f"the datamodule has reconstruction_source={dm_hparams['reconstruction_source']!r}, text for the "
                "least-squares refit, but StructuralPruneCallback(reconstruct=False) would not use it: set "
                "reconstruct: true, or data.reconstruction_source: null"
            )
        hparams = getattr(module, "hparams", {})
        if hparams.get("attach_lora_at_start", False):
            raise PrunerError(
                "`CausalLMModule(attach_lora_at_start=True)` wraps the model with LoRA before pruning: set "
                "model.attach_lora_at_start: false; StructuralPruneCallback prunes the dense model and "
                "attaches LoRA itself after pruning (attach_lora: true)"
            )

    def _check_sharded_setup(self, module: pl.LightningModule) -> None:
        if self.config.criterion in ("element2", "mix"):
            raise PrunerError(
                f"criterion {self.config.criterion!r} needs per-sample gradients, but under ModelParallelStrategy "
                "(FSDP2) gradients are averaged over ranks before any rank sees them: use criterion element1 "
                "(the paper's default) or vector, or strategy: ddp"
            )
        if self.config.measures_attention or self.config.iterative_steps > 1:
            what = ("attention_selection='measured'" if self.config.measures_attention
                    else f"iterative_steps={self.config.iterative_steps}")
            raise PrunerError(
                f"{what} is not supported under ModelParallelStrategy (FSDP2): it would run forward/backward "
                "passes on the gathered, unsharded model; use attention_selection: score and iterative_steps: 1, "
                "or strategy: ddp"
            )
        for attr in ("shard_model", "replace_hf_model"):
            if not hasattr(module, attr):
                raise PrunerError(
                    f"under ModelParallelStrategy (FSDP2) StructuralPruneCallback needs `module.{attr}()` to "
                    f"rebuild the sharded model after pruning; {type(module).__name__} has none: use "
                    "pruner.lightning_modules.causal_lm.CausalLMModule or implement it"
                )

    @property
    def _keeps_inputs(self) -> bool:
        return self.config.measures_attention or self.config.iterative_steps > 1

    @property
    def _prune_at(self) -> int:
        return self.prune_at_step if self.prune_at_step is not None else self._num_calibration

    def _in_calibration(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.current_epoch == 0 and self._prune_at - self._num_calibration <= batch_idx < self._prune_at

    def _inspect_dense_model(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Discovers the prunable structure of the dense model and records what the plan needs."""
        from pruner.api import count_parameters
        from pruner.discovery import discover
        from pruner.plan import model_fingerprint

        self._num_calibration = self._resolve_calibration_batches(trainer)
        if self._prune_at < self._num_calibration:
            raise PrunerError(
                f"`StructuralPruneCallback(prune_at_step={self.prune_at_step})` comes before the "
                f"{self._num_calibration} calibration batches end: use prune_at_step >= {self._num_calibration}"
            )
        total_batches = trainer.num_training_batches
        if isinstance(total_batches, int) and total_batches < self._prune_at:
            raise PrunerError(
                f"the train loader has {total_batches} batches per epoch, fewer than the {self._prune_at} "
                "batches before pruning: add recovery data or lower calibration_batches/prune_at_step"
            )
        if trainer.max_steps != -1 and trainer.max_steps < self._prune_at and trainer.accumulate_grad_batches == 1:
            rank_zero_warn(
                f"trainer.max_steps={trainer.max_steps} ends fit before the prune step ({self._prune_at} batches):"
                " the model will not be pruned; Lightning counts calibration batches as steps"
            )
        model = module.hf_model
        if self._sharded:  # discovery probes layers with real tensors: work on a gathered copy
            from pruner.sharding import unsharded_copy

            model = unsharded_copy(model)
        self._structure = discover(model, seed=self.config.seed)
        self.config.check_model(len(self._structure.layers))
        self._total_before = count_parameters(model)
        self._fingerprint = model_fingerprint(model)

    def _resolve_calibration_batches(self, trainer: pl.Trainer) -> int:
        if self.calibration_batches is not None:
            return self.calibration_batches
        n = getattr(trainer.datamodule, "calibration_batches", None) if trainer.datamodule is not None else None
        if not isinstance(n, int) or n < 1:
            raise PrunerError(
                "StructuralPruneCallback(calibration_batches=None) takes the count from the datamodule, but "
                f"{type(trainer.datamodule).__name__ if trainer.datamodule is not None else 'no datamodule'} "
                "has no `calibration_batches`: pass calibration_batches=N or use PruneDataModule"
            )
        return n

    def _calibration_batch(self, trainer: pl.Trainer, module: pl.LightningModule, batch: dict) -> None:
        if self._estimator is None:
            self._start_calibration(trainer, module)
        module.hf_model.eval()  # no dropout in importance (as pruner.prune); Lightning may re-enable it
        ids = batch["input_ids"]
        if self._keeps_inputs:  # kept (a few KB) for the measured choice / later iterative steps
            self._calibration_inputs.append({k: batch[k].detach().cpu() for k in ("input_ids", "attention_mask",
                                                                                  "labels") if batch.get(k) is not None})
        self._tokens_per_sample = int(ids.shape[-1])
        self._estimator.begin_batch(int(ids.shape[0]) if ids.dim() == 2 else 1)
        self._calibrated_batches += 1

    def _start_calibration(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from pruner.api import families_for
        from pruner.importance import ImportanceEstimator

        self._unwrap_ddp(trainer)
        module.calibrating = True
        est = ImportanceEstimator(module.hf_model, families_for(self._structure, self.config),
                                  self.config.criterion, self.config.seed, sharded=self._sharded)
        if self._pending_importance is not None and self._sharded:
            raise PrunerError("resuming in the middle of calibration is not supported under ModelParallelStrategy "
                              "(FSDP2): restart the fit, or calibrate with strategy: ddp")
        if self._pending_importance is not None:  # resumed in the middle of calibration
            est.load_state({k: v.to(module.device) for k, v in self._pending_importance.items()})
            self._pending_importance = None
        est.attach()
        self._estimator = est
        self._reconstruction_batches = self._datamodule_reconstruction(trainer)
        if self.config.reconstruct and not self._reconstruction_batches:  # the calibration batches feed the refit
            from pruner.reconstruction import GramCollector, consumers

            self._collector = GramCollector(module.hf_model, consumers(self._structure, self.config))
            if self._pending_grams is not None:
                self._collector.grams = {k: v.to(module.device) for k, v in self._pending_grams["grams"].items()}
                self._collector.tokens = dict(self._pending_grams["tokens"])
                self._pending_grams = None
            self._collector.attach()

    def _datamodule_reconstruction(self, trainer: pl.Trainer) -> list[torch.Tensor]:
        """This rank's refit text from ``datamodule.reconstruction_batches()`` (input_ids
        batches; the same count on every rank under FSDP2), or [] to refit on calibration."""
        make = getattr(trainer.datamodule, "reconstruction_batches", None) if self.config.reconstruct else None
        return list(make()) if callable(make) else []

    def _collect_reconstruction(self, module: pl.LightningModule, model, structure):
        """The refit's statistics of ``model`` from forward passes over this rank's
        reconstruction batches (under FSDP2 through the sharded root ``module.lm``)."""
        from pruner.api import collect_inputs
        from pruner.reconstruction import GramCollector, consumers

        collector = GramCollector(model, consumers(structure, self.config))
        collect_inputs(module.lm if self._sharded else model, self._reconstruction_batches, collector)
        return collector

    @staticmethod
    def _unwrap_ddp(trainer: pl.Trainer) -> None:
        # Calibration runs on the bare module: DDP would average the gradients (we want each
        # rank's own sum, all-reduced once at the end) and its reducer expects gradients for
        # parameters the estimator freezes. The wrapper is rebuilt after pruning anyway.
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = trainer.lightning_module

    def _reduced_importance(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        """The estimator's accumulators summed over ranks with ONE all-reduce of a flat vector,
        corrected for Lightning's ``1/accumulate_grad_batches`` loss scaling."""
        state = self._estimator.state()
        if self._sharded:  # gradient sums are rank-local shards: they stay, scaled, out of the reduce
            local = {k: v for k, v in state.items() if k.startswith("grad::")}
            state = {k: v for k, v in state.items() if not k.startswith("grad::")}
        keys = sorted(state)
        flat = torch.cat([state[k].detach().float().reshape(-1) for k in keys])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        out, offset = {}, 0
        scale = float(trainer.accumulate_grad_batches)
        for k in keys:
            n = state[k].numel()
            v = flat[offset: offset + n].reshape(state[k].shape)
            offset += n
            if scale != 1.0 and k.startswith("grad::"):
                v = v * scale
            elif scale != 1.0 and k.startswith("fisher::"):
                v = v * scale**2
            out[k] = v
        if self._sharded:
            out.update({k: v * scale for k, v in local.items()})
        return out

    def _sum_over_ranks(self, trainer: pl.Trainer, vectors: dict) -> dict:
        """FSDP2: every rank scored only its own shards; one all-reduce of the flat vectors sums them."""
        keys = sorted(vectors)
        flat = torch.cat([vectors[k].reshape(-1) for k in keys])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        return dict(zip(keys, torch.split(flat, [vectors[k].numel() for k in keys])))

    def _prune(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from pruner.api import count_parameters, finish_plan

        est = self._estimator
        if est is None:  # a resumed run whose checkpoint came after calibration ended cannot happen
            raise PrunerError("no calibration batch was seen before the prune step")
        est.detach()
        if self._collector is not None:
            self._collector.detach()
        module.zero_grad(set_to_none=True)
        if self._reconstruction_batches:  # before the FSDP2 gather: every rank runs its share
            self._collector = self._collect_reconstruction(module, module.hf_model, self._structure)
        est.load_state(self._reduced_importance(trainer))
        vectors = est.vectors()
        if self._sharded:
            vectors = self._sum_over_ranks(trainer, vectors)
        self.vectors = vectors  # per-index saliences, summed over ranks (small: no model-sized tensor)
        if self._sharded:  # gather the shards into an ordinary CPU model; sharded again below
            from pruner.sharding import unsharded_copy

            module.replace_hf_model(unsharded_copy(module.hf_model))
        model = module.hf_model
        plan = self._select_and_remove(trainer, module, vectors)
        if self._sharded:
            from pruner.sharding import build_skeleton

            self._pruned_skeleton = build_skeleton(model)
        else:
            self._measure(trainer, module, "pruned")
        calibration = {"batches": self._calibrated_batches * trainer.world_size, "samples": est.num_samples,
                       "tokens_per_sample": self._tokens_per_sample, "world_size": trainer.world_size}
        if self._reconstruction_batches:
            calibration["reconstruction_tokens"] = trainer.world_size * sum(b.numel() for b in
                                                                            self._reconstruction_batches)
        plan = finish_plan(plan, model, self._structure, self._fingerprint, self._total_before, self.config,
                           calibration)
        self.plan, self._pruned, self._estimator, self._collector = plan, True, None, None
        self._calibration_inputs, self._reconstruction_batches = [], []
        module.pruning_plan = plan.to_dict()
        module.calibrating = False
        model.train()
        if self.attach_lora:
            # seeded adapters: the same on every rank and world size, whatever ran before
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                module.attach_lora()
        if self._sharded:
            module.shard_model()  # fully_shard also moves the CPU copy to the mesh's device
            trainer.strategy.model_to_device()
            self._measure(trainer, module, "pruned")
        self._rebuild_training(trainer)
        if self.verbose:
            p = plan.params
            rank_zero_info(
                f"StructuralPruneCallback: pruned at batch {self._prune_at}: {p['before']:,} -> {p['after']:,} "
                f"parameters ({p['removed_fraction']:.1%} removed); trainable now "
                f"{sum(q.numel() for q in module.parameters() if q.requires_grad):,} "
                f"of {count_parameters(module):,}"
            )

    def _select_and_remove(self, trainer: pl.Trainer, module: pl.LightningModule, vectors: dict):
        """Selection and surgery, in ``iterative_steps`` steps (as ``pruner.prune``); returns the
        plan in dense indices. Every step is checked on all ranks before its weights change."""
        from pruner.api import _step_config, compose, count_parameters, make_plan
        from pruner.discovery import discover
        from pruner.surgery import apply_plan

        model, cfg, plan, structure = module.hf_model, self.config, None, self._structure
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()} for b in self._calibration_inputs]
        collector = self._reduced_grams(trainer, self._collector, model) if cfg.reconstruct else None
        for step in range(1, cfg.iterative_steps + 1):
            step_cfg = _step_config(cfg, step, self._total_before, count_parameters(model))
            if step > 1:
                structure = discover(model, seed=cfg.seed)
                vectors, collector = self._estimate_on(trainer, module, model, structure, step_cfg, batches)
            step_plan = make_plan(structure, vectors, step_cfg, count_parameters(model))
            if cfg.measures_attention and batches:
                from pruner.refine import refine_attention

                # every rank measures its own calibration batches; the loss sums are all-reduced
                step_plan = refine_attention(model, structure, step_plan, batches, all_reduce=lambda t: (
                    trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()))
            if cfg.attention_selection == "obs":  # the config guarantees reconstruct, hence the statistics
                from pruner.reconstruction import select_heads_obs

                step_plan = select_heads_obs(step_plan, structure, model, collector, cfg.reconstruct_damping)
            if cfg.mlp_selection == "obs":
                from pruner.reconstruction import select_mlp_obs

                step_plan = select_mlp_obs(step_plan, structure, model, collector, cfg.reconstruct_damping)
            self._check_ranks_agree(trainer, step_plan)
            self._check_lora_targets_survive(module, step_plan, structure)
            if step == 1 and getattr(module, "wants_teacher", False) and module.teacher is None:
                module.keep_teacher(model)  # distillation: the dense model, frozen, before surgery
            if collector is not None:
                from pruner.reconstruction import compensate

                compensate(step_plan, structure, model, collector, cfg.reconstruct_damping)
            apply_plan(step_plan, model, structure)
            groups = step_plan.groups
            plan = step_plan if plan is None else compose(plan, step_plan, self._structure)
        plan.groups = groups  # the last step's scores (as pruner.prune)
        return plan

    @staticmethod
    def _reduced_grams(trainer: pl.Trainer, local, model):
        """``local``'s input statistics summed over ranks (one all-reduce, fp64), as a collector
        for ``model`` (the module the refit changes: under FSDP2 the gathered copy)."""
        from pruner.reconstruction import GramCollector

        device = next(model.parameters()).device
        names = [n for n in local.names if n in local.grams]
        if not names:  # nothing the plan can prune was reached (the same on every rank)
            return GramCollector(model, [])
        flat = torch.cat([local.grams[n].reshape(-1) for n in names]
                         + [torch.tensor([float(local.tokens[n]) for n in names], dtype=torch.float64,
                                         device=local.grams[names[0]].device)])
        flat = trainer.strategy.reduce(flat, reduce_op="sum").to(device)
        sizes = [local.grams[n].numel() for n in names] + [len(names)]
        *grams, tokens = torch.split(flat, sizes)
        out = GramCollector(model, names)
        out.grams = {n: g.reshape(local.grams[n].shape) for n, g in zip(names, grams)}
        out.tokens = {n: int(t) for n, t in zip(names, tokens.tolist())}
        return out

    def _estimate_on(self, trainer: pl.Trainer, module: pl.LightningModule, model, structure, cfg,
                     batches: list[dict]):
        """Importance of the partly pruned ``model`` on this rank's kept calibration batches,
        accumulators summed over ranks (one all-reduce), as in calibration; with ``reconstruct``
        also the refit's statistics of the partly pruned model (on the reconstruction batches
        if any, else on the calibration batches; None without ``reconstruct``)."""
        from pruner.api import families_for
        from pruner.importance import ImportanceEstimator
        from pruner.reconstruction import GramCollector, consumers

        est = ImportanceEstimator(model, families_for(structure, cfg), cfg.criterion, cfg.seed)
        collector = None
        if cfg.reconstruct and not self._reconstruction_batches:  # statistics from the calibration batches
            collector = GramCollector(model, consumers(structure, cfg))
        model.eval()
        est.attach()
        if collector is not None:
            collector.attach()
        try:
            for batch in batches:
                est.begin_batch(int(batch["input_ids"].shape[0]))
                model(**batch).loss.backward()
        finally:
            est.detach()
            if collector is not None:
                collector.detach()
            model.zero_grad(set_to_none=True)
        if cfg.reconstruct and self._reconstruction_batches:  # the partly pruned model on the refit text
            collector = self._collect_reconstruction(module, model, structure)
        if collector is not None:
            collector = self._reduced_grams(trainer, collector, model)
        state = est.state()
        keys = sorted(state)
        flat = trainer.strategy.reduce(torch.cat([state[k].float().reshape(-1) for k in keys]), reduce_op="sum")
        est.load_state(dict(zip(keys, (t.reshape(state[k].shape) for k, t in
                                       zip(keys, torch.split(flat, [state[k].numel() for k in keys]))))))
        return est.vectors(), collector

    def _check_lora_targets_survive(self, module: pl.LightningModule, plan, structure) -> None:
        """Refuses, before any weight changes, a plan that deletes every module a LoRA target
        names (e.g. a target spelled with a layer index that layer-wise pruning removes)."""
        if not self.attach_lora or not hasattr(module, "missing_lora_targets"):
            return
        removed = [structure.layers[lp.index].path for lp in plan.layers if lp.removed]
        gone = module.missing_lora_targets(removed)
        if gone:
            raise PrunerError(
                f"LoRA target(s) {gone} exist only in layers the plan removes ({removed}): target module "
                "names without a layer index (e.g. q_proj), or keep those layers out of `layers`"
            )

    @staticmethod
    def _check_ranks_agree(trainer: pl.Trainer, plan) -> None:
        digest = hashlib.sha256(plan.to_json().encode()).hexdigest()
        reference = trainer.strategy.broadcast(digest, src=0)
        # every rank must learn whether ANY rank disagrees, or the agreeing ones would hang later
        disagree = trainer.strategy.reduce(torch.tensor(float(digest != reference)), reduce_op="sum")
        if float(disagree) > 0:
            raise PrunerError(
                f"ranks disagree on the pruning plan ({int(float(disagree))} of {trainer.world_size} differ from "
                "rank 0): the models or importance scores differ between ranks; check that every rank loads "
                "the same weights and that selection is deterministic"
            )

    @staticmethod
    def _rebuild_training(trainer: pl.Trainer) -> None:
        """New parameters need a new optimizer and, under DDP, a new wrapper (its reducer
        holds the old parameter list); DDP's constructor also checks shapes across ranks."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)

    def _finish(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self._pruned:
            rank_zero_warn(
                f"StructuralPruneCallback: fit ended before the prune step ({self._prune_at_or_unknown()} train "
                "batches); the model was not pruned and nothing was exported. Raise trainer.max_steps"
            )
            return
        if self.export_dir is None:
            return
        from pruner.io import save_pretrained

        if self._sharded:
            self._measure(trainer, module, "recovered")
            model = self._gather_for_export(trainer, module)
        else:
            if getattr(module, "has_lora", False):
                module.merge_lora()  # on every rank: the modules stay identical
            self._measure(trainer, module, "recovered")
            model = module.hf_model
        folder = Path(self.export_dir)
        if trainer.is_global_zero:
            save_pretrained(model, folder, tokenizer=getattr(module, "tokenizer", None), plan=self.plan,
                            overwrite=self.overwrite_export, extra_files={"report.md": self._report(trainer)})
        trainer.strategy.barrier("pruner-export")
        self.export_path = folder.resolve()
        if self.verbose:
            rank_zero_info(f"StructuralPruneCallback: exported the pruned model to {self.export_path}")

    def _gather_for_export(self, trainer: pl.Trainer, module: pl.LightningModule):
        """FSDP2: the trained shards gathered into an ordinary pruned model with LoRA merged, on
        rank 0 only (the other ranks join the gathers and return None)."""
        from pruner.sharding import full_state_dict, materialize, skeleton_from

        state = full_state_dict(module.lm, keep=trainer.is_global_zero)
        if not trainer.is_global_zero:
            return None
        skeleton = skeleton_from(*self._pruned_skeleton)
        if getattr(module, "has_lora", False):
            from peft import get_peft_model

            skeleton = get_peft_model(skeleton, module.lora_config())
        model = materialize(skeleton, state, module.lm)
        return model.merge_and_unload() if getattr(module, "has_lora", False) else model

    def _measure(self, trainer: pl.Trainer, module: pl.LightningModule, when: str) -> None:
        """Validation perplexity of ``module.hf_model`` now (every rank computes the same)."""
        dm = trainer.datamodule
        if not self.report_perplexity or dm is None or not hasattr(dm, "val_dataloader"):
            return
        loader = dm.val_dataloader()
        if not loader:
            return
        from pruner.eval.perplexity import loader_perplexity

        # FSDP2: call the root of the sharding (the peft wrapper, if any), whose hooks gather its weights
        model = module.lm if self._sharded else module.hf_model
        self.perplexity[when] = loader_perplexity(model, loader, module.device)
        if self.verbose:
            rank_zero_info(f"StructuralPruneCallback: validation perplexity ({when}): {self.perplexity[when]:.2f}")

    def _report(self, trainer: pl.Trainer) -> str:
        p, plan = self.plan.params, self.plan
        lines = ["# Pruning report", "", f"Written by StructuralPruneCallback (pruner {plan.pruner_version}).", "",
                 "| | parameters |", "|---|---|", f"| before | {p['before']:,} |", f"| after | {p['after']:,} |",
                 f"| removed | {p['removed']:,} ({p['removed_fraction']:.2%}) |", ""]
        if self.perplexity:
            labels = {"dense": "dense (before pruning)", "pruned": "pruned, before recovery",
                      "recovered": f"after recovery ({trainer.global_step - self._prune_at} steps)"}
            lines += ["| validation perplexity | |", "|---|---|"]
            lines += [f"| {labels[k]} | {v:.3f} |" for k, v in self.perplexity.items()] + [""]
        else:
            lines += ["No validation data (data.val_source): perplexity not measured.", ""]
        s = plan.settings
        lines += ["Settings: " + ", ".join(f"{k}={s[k]}" for k in REPORT_SETTINGS if k in s),
                  f"Calibration: {plan.calibration}", "", "The exact plan is in plan.json."]
        return "\n".join(lines) + "\n"

    def _prune_at_or_unknown(self) -> str:
        return str(self._prune_at) if hasattr(self, "_num_calibration") else "?"
