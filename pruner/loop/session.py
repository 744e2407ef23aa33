"""One prune, from calibration to the pruned model, without Lightning: ``pruner.prune`` and
``StructuralPruneCallback`` both drive a :class:`PruneSession`.

The session decides *what* goes; its driver decides *when*, and where the gradients come from:

* ``pruner.prune`` hands it the calibration batches, and the session runs them forward and
  backward itself at :meth:`PruneSession.prune`;
* the Lightning callback lets the user's ``training_step`` run them: it calls
  :meth:`~PruneSession.start_recording` once, :meth:`~PruneSession.record` before each
  calibration batch's backward (and :meth:`~PruneSession.accumulate_shards` after it under
  FSDP2), then :meth:`~PruneSession.prune` with the strategy's collectives (:class:`Ranks`).

:meth:`PruneSession.prune` runs the refit's statistics over the reconstruction text, sums what
each rank recorded, and runs :func:`~pruner.loop.steps.prune_steps` (select -> refine/OBS ->
refit -> regional fit -> remove, iterative steps re-estimating on the kept calibration batches).
Its calibration state (:meth:`~PruneSession.state_dict`) is a flat dict of tensors and counts, so
a fit interrupted in the middle of calibration resumes exactly.

Example:
    >>> import torch
    >>> from pruner.config import PruneConfig
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> batches = [torch.randint(3, 120, (2, 16)) for _ in range(2)]
    >>> session = PruneSession(model, PruneConfig(pruning_ratio=0.5), calibration_batches=batches)
    >>> plan = session.prune(model)
    >>> model.model.layers[0].mlp.up_proj.out_features, plan.calibration["samples"]
    (48, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..batches import MICRO_BATCH_TOKENS, as_batch, micro_batches
from ..checks import check_finite_weights
from ..config import PruneConfig
from ..errors import PrunerError
from ..importance import CRITERIA, ImportanceEstimator
from ..precision import warn_if_bf16_is_emulated
from ..refit.statistics import GramCollector, collect_output_fisher, consumers
from ..refit.walk import Window, reduced_statistics
from ..selection import check_prunable
from ..structure import ModelStructure, Plan, count_parameters, discover, model_fingerprint
from .calibration import Reduce, estimate_importance, families_for
from .steps import StepHooks, finish_plan, prune_steps


@dataclass
class Ranks:
    """How a session's numbers meet across processes: ``reduce`` sums a dict of tensors over
    ranks (same keys and shapes on every rank), ``all_reduce`` sums one tensor."""

    world_size: int
    reduce: Reduce
    all_reduce: Callable[[torch.Tensor], torch.Tensor]


def calibration_reruns(cfg: PruneConfig, has_text: bool = True, gathered_only: bool = False) -> str | None:
    """The setting that makes the prune step run the calibration batches again itself (None if
    none): the measured attention choice and later iterative steps (on the model as pruned so
    far; under FSDP2 a gathered copy), or, unless ``gathered_only``, obs-fisher's backward passes
    where there is no reconstruction text (``has_text``).

    Example:
        >>> calibration_reruns(PruneConfig(pruning_ratio=0.5, iterative_steps=2))
        'iterative_steps=2'
    """
    if cfg.measures_attention:
        return "attention_selection='measured'"
    if cfg.iterative_steps > 1:
        return f"iterative_steps={cfg.iterative_steps}"
    if not gathered_only and cfg.mlp_selection == "obs-fisher" and not has_text:
        return "mlp_selection='obs-fisher' without reconstruction text"
    if not gathered_only and cfg.reconstruct and not has_text:
        return "reconstruct=True without reconstruction text (the refit walks the calibration batches)"
    return None


def check_data(cfg: PruneConfig, calibration: bool, reconstruction: bool) -> None:
    """Refuses, before any work, options that the batches at hand cannot honour (rather than
    skipping them and recording them in the plan as if they had run).

    Example:
        >>> check_data(PruneConfig(pruning_ratio=0.5, criterion="l1", reconstruct=True), False, False)
        Traceback (most recent call last):
        ...
        pruner.errors.PrunerError: reconstruct=True refits on the inputs of the pruned layers, but no batch was given: pass calibration batches or reconstruction_batches, or set reconstruct=False
    """
    criterion = CRITERIA[cfg.criterion]
    if not calibration and (criterion.needs_gradients or criterion.needs_activations):
        data_free = sorted(n for n, c in CRITERIA.items() if not (c.needs_gradients or c.needs_activations))
        raise PrunerError(f"no calibration batches: criterion {cfg.criterion!r} needs at least one; pass "
                          f"input_ids batches, or use a data-free criterion ({', '.join(data_free)})")
    if not calibration and cfg.measures_attention:
        raise PrunerError("attention_selection='measured' chooses heads by the calibration loss, but no calibration "
                          "batch was given: pass calibration batches, or use attention_selection='score'")
    if not (calibration or reconstruction) and cfg.reconstruct:
        raise PrunerError("reconstruct=True refits on the inputs of the pruned layers, but no batch was given: pass "
                          "calibration batches or reconstruction_batches, or set reconstruct=False")


class PruneSession:
    """The calibration state of one prune and the prune step that consumes it.

    Args:
        model: the dense model (sharded by FSDP2 or not): its structure is discovered, counted
            and fingerprinted here; it is not kept.
        config: what to prune and how.
        calibration_batches: batches the session runs itself (``pruner.prune``); a recording
            driver leaves them out and the session keeps what :meth:`record` is given where a
            setting reruns them (:func:`calibration_reruns`).
        reconstruction_batches: the refit's text (forward passes only; this rank's share);
            None = the calibration batches feed the refit.
        sharded: the model the driver records on is sharded by FSDP2 (gradient shards, no
            early stop of forward passes: each module reshards in its own hooks).
        max_tokens_per_backward: tokens per backward of the session's own calibration passes.
        activation_checkpointing: those passes recompute each decoder layer in the backward
            instead of keeping its activations (:func:`pruner.loop.calibration.checkpointed_layers`).
        progress: progress bars for the session's own passes.
        probe: what discovery probes instead of ``model``, its weights already checked for
            NaN/inf (a sharded model: :func:`pruner.distributed.gather.discovery_copy`, the
            embedding and the decoder layers up to the last one probed); None = ``model`` itself.
    """

    def __init__(self, model: nn.Module, config: PruneConfig, *, calibration_batches: list | None = None,
                 reconstruction_batches: list | None = None, sharded: bool = False,
                 max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS, progress: bool = False,
                 probe: nn.Module | None = None, activation_checkpointing: bool = False):
        self.config = config
        if probe is None:
            check_finite_weights(model)
        self.structure: ModelStructure = discover(model if probe is None else probe, seed=config.seed)
        config.check_model(len(self.structure.layers))
        check_prunable(self.structure, config)
        self.total_before = count_parameters(model)
        self.fingerprint = model_fingerprint(model)
        self.sharded = sharded
        self.max_tokens_per_backward = max_tokens_per_backward
        self.activation_checkpointing = activation_checkpointing
        self.progress = progress
        self.window: Window | None = None  # FSDP2 with reconstruct: the layer-by-layer copy the prune step walked
        device = next(model.parameters()).device
        if next(model.parameters()).dtype == torch.bfloat16:
            warn_if_bf16_is_emulated(device, "a model in bfloat16", "load it in float32 (dtype=torch.float32)")
        self.calibration: list[dict[str, torch.Tensor]] = [as_batch(b, device) for b in calibration_batches or []]
        self.reconstruction: list[dict[str, torch.Tensor]] = [as_batch(b, "cpu") for b in reconstruction_batches or []]
        self.batches = len(self.calibration)  # calibration batches seen (this rank)
        self.samples = sum(b["input_ids"].shape[0] for b in self.calibration)
        self.tokens_per_sample = int(self.calibration[0]["input_ids"].shape[1]) if self.calibration else 0
        self.estimator: ImportanceEstimator | None = None  # recording: the driver runs the passes
        self.runs_calibration = calibration_batches is not None  # pruner.prune: the session runs the batches
        self.vectors: dict | None = None  # the importance vectors step 1 selected from
        self.model: nn.Module | None = None  # the pruned model (under FSDP2 a gathered or meta copy)
        self._pending: dict = {}  # accumulators of a checkpoint, loaded when recording starts

    # ------------------------------------------------------------------ recording (a driver runs the passes)

    @property
    def recording(self) -> bool:
        return self.estimator is not None

    @property
    def keeps_inputs(self) -> bool:
        """Whether :meth:`record` keeps the batches (a few KB): the prune step reruns them."""
        return calibration_reruns(self.config, has_text=bool(self.reconstruction)) is not None

    def start_recording(self, model: nn.Module, reconstruction_batches: list | None = None) -> None:
        """Hooks the estimator onto ``model`` for the driver's calibration passes; a checkpoint's
        accumulators resume here."""
        cfg = self.config
        if reconstruction_batches is not None:
            self.reconstruction = [as_batch(b, "cpu") for b in reconstruction_batches]
        est = ImportanceEstimator(model, families_for(self.structure, cfg), cfg.criterion, cfg.seed,
                                  sharded=self.sharded)
        if "importance" in self._pending:
            if self.sharded:
                raise PrunerError("resuming in the middle of calibration is not supported under ModelParallelStrategy "
                                  "(FSDP2): restart the fit, or calibrate with strategy: ddp")
            device = next(model.parameters()).device
            est.load_state({k: v.to(device) for k, v in self._pending.pop("importance").items()})
        est.attach()
        self.estimator = est

    def record(self, inputs: dict[str, torch.Tensor] | None, samples: int) -> None:
        """Call before a calibration batch's backward: ``samples`` in the batch (its loss
        averages over them); ``inputs`` its ``input_ids`` (+ masks, labels) on the CPU, kept
        when the prune step reruns the batches (None where the batch has no such dict)."""
        if inputs is not None:
            self.tokens_per_sample = int(inputs["input_ids"].shape[-1])
            if self.keeps_inputs:
                self.calibration.append(inputs)
        self.estimator.begin_batch(samples)
        self.samples += samples
        self.batches += 1

    def discard_last(self) -> None:
        """The last recorded batch ran no backward (its ``training_step`` returned None): it is not
        counted, and not rerun."""
        samples = self.estimator.discard_batch()
        self.samples -= samples
        self.batches -= 1
        if self.keeps_inputs and self.calibration:
            self.calibration.pop()

    def accumulate_shards(self, world_size: int) -> None:
        """FSDP2: after a calibration backward, this rank's gradient shards into the sums."""
        self.estimator.accumulate_gradients(world_size)

    def pause(self) -> None:
        """Stops recording (e.g. during validation) until :meth:`resume`."""
        if self.estimator is not None:
            self.estimator.detach()

    def resume(self) -> None:
        if self.estimator is not None:
            self.estimator.attach()

    # ------------------------------------------------------------------ the prune step

    def prune(self, model: nn.Module, *, ranks: Ranks | None = None, loss_scale: float = 1.0,
              check: Callable[[Plan, ModelStructure], None] | None = None,
              before_surgery: Callable[[nn.Module], None] | None = None,
              unshard: Callable[[nn.Module], nn.Module] | None = None,
              window: Callable[[nn.Module], Window] | None = None) -> Plan:
        """Prunes ``model`` in place (or, with ``unshard``, the copy it returns: :attr:`model`
        either way) and returns the finished plan. Under FSDP2 ``unshard`` gives an unsharded
        copy (every rank holds the whole model) or, where the step reads no weight values after
        selection, :func:`~pruner.distributed.gather.meta_copy` (the driver then fills the
        pruned shards: :func:`pruner.structure.pruned_sources`).

        ``ranks``: the collectives of a multi-process driver (None: one process). ``loss_scale``:
        what the driver divided each calibration loss by (Lightning's gradient accumulation).
        ``check``: called with each step's plan before its weights change. ``before_surgery``:
        called with the dense model just before the first weight changes. Every step's surgery
        is undone if any step fails. ``window`` (FSDP2 with ``reconstruct``, instead of
        ``unshard``): the refit walks ``window(model)``'s copy, one decoder layer gathered at a
        time; :attr:`model` is then its meta skeleton with the pruned widths, and :attr:`window`
        holds the walked layers' new weights (the driver fills the pruned shards from them)."""
        first = None
        opened: list[Window] = []
        if window is not None and (not self.recording or calibration_reruns(self.config, gathered_only=True)):
            raise PrunerError("PruneSession.prune(window=...) walks a copy that holds one decoder layer at a time: the "
                              "importance must be recorded on the dense model (start_recording, record) and no "
                              "setting may rerun the calibration on the copy (attention_selection='measured', "
                              "iterative_steps > 1)")
        if window is not None:
            def unshard(dense: nn.Module) -> nn.Module:  # the copy the steps prune, opened where the gather was
                opened.append(window(dense))
                return opened[0].model
        if self.recording:  # step 1 from what the driver's passes recorded
            first, model = self._recorded_step(model, ranks, loss_scale, unshard)
        elif unshard is not None:
            model = unshard(model)
        calibration = self._on(model, self.calibration)
        self.window = opened[0] if opened else None
        hooks = StepHooks(estimate=lambda m, s, c: self.estimate(m, s, c, ranks), refine_batches=calibration,
                          all_reduce=ranks.all_reduce if ranks else None, check=check, before_surgery=before_surgery,
                          text=self._walk_text(model) if self.config.reconstruct else [],
                          fit_text=self._on(model, self._refit_text()) if self.config.regional_epochs else [],
                          reduce=ranks.reduce if ranks else None, window=self.window)
        plan = prune_steps(model, self.structure, self.config, hooks, first=first)
        plan = finish_plan(plan, model, self.structure, self.fingerprint, self.total_before, self.config,
                           self.summary(ranks))
        if self.window is not None:
            model = self.window.close()
        self.model = model
        self.calibration, self.reconstruction = [], []  # spent
        return plan

    def estimate(self, model: nn.Module, structure: ModelStructure, step_config: PruneConfig,
                 ranks: Ranks | None = None) -> tuple[dict, GramCollector | None]:
        """Importance of ``model`` as it is now on the kept calibration batches (summed over
        ranks) and, for ``mlp_selection="obs-fisher"``, the loss's output Fisher at the consumers."""
        vectors = estimate_importance(model, self._on(model, self.calibration), structure, step_config, self.progress,
                                      reduce=ranks.reduce if ranks else None,
                                      max_tokens_per_backward=self.max_tokens_per_backward,
                                      activation_checkpointing=self.activation_checkpointing)
        return vectors, self._output_fisher(model, structure, ranks)

    def summary(self, ranks: Ranks | None = None) -> dict:
        """The plan's calibration record: batches and samples over all ranks, tokens per sample."""
        world = ranks.world_size if ranks else 1
        out = {"batches": self.batches * world, "samples": self.samples, "tokens_per_sample": self.tokens_per_sample}
        if ranks is not None:
            out["world_size"] = world
        if self.reconstruction:
            out["reconstruction_tokens"] = world * sum(b["input_ids"].numel() for b in self.reconstruction)
        return out

    def _recorded_step(self, model: nn.Module, ranks: Ranks | None, loss_scale: float,
                       unshard: Callable[[nn.Module], nn.Module] | None):
        """Step 1's (vectors, fisher) from the recorded passes, and the model to prune."""
        est = self.estimator
        self.pause()
        self.estimator = None
        fisher = self._output_fisher(model, self.structure, None)  # before any gather: through the (sharded) model
        state = self._reduced_importance(est.state(), ranks, loss_scale)
        est.load_state(state)
        self.samples = int(state["num_samples"].item())
        vectors = est.vectors()
        if self.sharded:  # every rank scored only its own shards: the sum is the full score
            vectors = ranks.reduce(vectors)
        self.vectors = vectors  # per-index saliences, summed over ranks (small: no model-sized tensor)
        if unshard is not None:
            model = unshard(model)
        if fisher is not None and ranks is not None:
            fisher = reduced_statistics(fisher, model, ranks.reduce)
        return (vectors, fisher), model

    def _output_fisher(self, model: nn.Module, structure: ModelStructure, ranks: Ranks | None) -> GramCollector | None:
        """obs-fisher: this rank's share of ``fisher_samples`` sequences of the refit's text run
        backward, the loss's squared gradient at each consumer's outputs (summed over ``ranks``)."""
        if self.config.mlp_selection != "obs-fisher":
            return None
        collector = GramCollector(model, consumers(structure, self.config))
        world = ranks.world_size if ranks else 1
        collect_output_fisher(model, self._on(model, self._refit_text()), collector,
                              -(-self.config.fisher_samples // world))
        return reduced_statistics(collector, model, ranks.reduce) if ranks is not None else collector

    def _refit_text(self) -> list[dict[str, torch.Tensor]]:
        return self.reconstruction or self.calibration

    def _walk_text(self, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        """The batches the refit walks: the reconstruction text, else the calibration batches
        split as the session's own calibration passes split them."""
        if self.reconstruction or not self.runs_calibration:
            return self._on(model, self._refit_text())
        per_sample = CRITERIA[self.config.criterion].needs_per_sample
        return [part for batch in self._on(model, self.calibration)
                for part, _, _ in micro_batches(batch, per_sample, self.max_tokens_per_backward)]

    @staticmethod
    def _on(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        return [{k: v.to(device) for k, v in b.items()} for b in batches]

    def _reduced_importance(self, state: dict[str, torch.Tensor], ranks: Ranks | None,
                            loss_scale: float) -> dict[str, torch.Tensor]:
        """The estimator's accumulators summed over ranks, corrected for a loss scaled by
        ``1/loss_scale``. Under FSDP2 the gradient sums are rank-local shards: they are not
        summed (each rank scores its own rows)."""
        local = {k: v for k, v in state.items() if self.sharded and k.startswith("grad::")}
        rest = {k: v.float() for k, v in state.items() if k not in local}
        out = ranks.reduce(rest) if ranks is not None else rest
        out.update(local)
        if loss_scale != 1.0:
            for k in out:
                if k.startswith("grad::"):
                    out[k] = out[k] * loss_scale
                elif k.startswith("fisher::"):
                    out[k] = out[k] * loss_scale**2
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The calibration state as a flat dict of counts and CPU tensors (for a checkpoint in
        the middle of calibration: the accumulators, the kept batches, the refit's Gram sums)."""
        state: dict = {"calibrated_batches": self.batches, "tokens_per_sample": self.tokens_per_sample}
        if self.estimator is not None:
            state["importance"] = {k: v.detach().cpu() for k, v in self.estimator.state().items()}
            state["calibration_inputs"] = self.calibration
        return state

    def load_state_dict(self, state: dict) -> None:
        """Counts and kept batches now; the accumulators when recording starts."""
        if "grams" in state:
            raise PrunerError("this checkpoint was written in the middle of calibration by an earlier pruner, which "
                              "kept the refit's statistics instead of the calibration batches: restart the fit")
        self.batches = int(state.get("calibrated_batches", 0))
        self.tokens_per_sample = int(state.get("tokens_per_sample", 0))
        self.calibration = list(state.get("calibration_inputs", []))
        self._pending = {k: state[k] for k in ("importance",) if k in state}
        if "importance" in state:
            self.samples = int(state["importance"]["num_samples"].item())
