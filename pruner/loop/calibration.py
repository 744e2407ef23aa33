"""The calibration pass: batches run forward and backward through the model while an
:class:`~pruner.importance.ImportanceEstimator` turns the gradients into per-index saliences.

Example:
    >>> import torch
    >>> from pruner.config import PruneConfig
    >>> from pruner.structure import discover
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> cfg = PruneConfig(pruning_ratio=0.5)
    >>> vectors = estimate_importance(model, [torch.randint(3, 120, (2, 12))], discover(model), cfg)
    >>> vectors[("model.layers.0.mlp.down_proj.weight", 1)].shape  # one salience per MLP channel
    torch.Size([96])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import MICRO_BATCH_TOKENS, as_batch, micro_batches
from ..config import PruneConfig
from ..errors import PrunerError
from ..importance import CRITERIA, ImportanceEstimator
from ..memory import release_freed_memory
from ..refit.statistics import GramCollector
from ..selection import in_range
from ..structure import ModelStructure

Reduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # sums every tensor over ranks


def estimate_importance(model: nn.Module, batches: list, structure: ModelStructure, cfg: PruneConfig,
                        progress: bool = False, collector: GramCollector | None = None,
                        reduce: Reduce | None = None, max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS):
    """Runs the calibration batches and returns the per-index salience vectors. A ``collector``
    (for ``reconstruct``) records the consumers' input statistics during the same passes.
    ``reduce`` sums the accumulators over ranks (each rank ran its own batches) before the
    vectors are computed from them (they are not linear in the gradient sums).
    ``max_tokens_per_backward``: each backward runs on at most this many tokens (whole samples),
    so memory does not grow with the calibration batch (the scores are those of the whole
    batch); None = one backward per batch (faster for large batches, more memory).

    Memory: several backwards keep one fp32 running sum per scored weight (4 bytes a parameter:
    27 GB for LLaMA-7B's decoder); when the whole calibration is ONE backward (one batch that
    fits ``max_tokens_per_backward``, e.g. the paper's 10 x 64 tokens as one batch with
    ``max_tokens_per_backward=None``), each weight's gradient is reduced to its scores as it is
    produced and nothing of model size is kept beyond the backward's own activations."""
    if not isinstance(cfg, PruneConfig):
        raise PrunerError(f"cfg must be a pruner.PruneConfig, got {type(cfg).__name__}: e.g. PruneConfig(criterion="
                          f"{cfg!r}, target_sparsity=0.2)" if isinstance(cfg, str) else
                          f"cfg must be a pruner.PruneConfig, got {type(cfg).__name__}")
    if batches is None or isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise PrunerError(f"batches must be an iterable of calibration batches, got {type(batches).__name__}")
    families = families_for(structure, cfg)
    device = next(model.parameters()).device
    batches = [as_batch(b, device) for b in batches]
    passes = sum(len(list(micro_batches(b, CRITERIA[cfg.criterion].needs_per_sample, max_tokens_per_backward)))
                 for b in batches)
    # direct_linear: plain autograd here (the Lightning callback, under DDP/FSDP/autocast, keeps .grad hooks);
    # one_pass: one backward, reduced as it comes (not when ranks must sum the gradients first)
    est = ImportanceEstimator(model, families, cfg.criterion, cfg.seed, direct_linear=True,
                              one_pass=passes == 1 and reduce is None)
    if not (CRITERIA[cfg.criterion].needs_gradients or CRITERIA[cfg.criterion].needs_activations) and collector is None:
        return est.vectors()
    was_training = model.training
    model.eval()  # no dropout: importance of the deterministic model
    est.attach()
    if collector is not None:
        collector.attach()
    release_freed_memory()  # what discovery and loading freed: the running sums are allocated now
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            for part, samples, weight in micro_batches(batch, est.criterion.needs_per_sample,
                                                        max_tokens_per_backward):
                est.begin_batch(samples, weight)
                if est.criterion.needs_gradients:
                    loss = model(**part).loss
                    if not torch.isfinite(loss):
                        raise PrunerError("calibration loss is NaN/inf: check the data and the model's dtype")
                    loss.backward()
                else:
                    with torch.no_grad():
                        model(**{k: v for k, v in part.items() if k != "labels"})
                # (no trim between backwards: the next one reuses the same blocks; trimming would
                # only make it fault the pages in again)
    finally:
        est.detach()
        if collector is not None:
            collector.detach()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if reduce is not None:
        est.load_state(reduce(est.state()))
    vectors = est.vectors(consume=True)  # each running sum is freed once scored
    del est
    release_freed_memory()
    return vectors


def families_for(structure: ModelStructure, cfg: PruneConfig):
    """The group families whose importance ``cfg`` needs."""
    fams = []
    if cfg.mode == "block":
        for info in structure.layers:
            if info.attention is not None and cfg.prunes("attention", info.index):
                fams += [info.attention.heads, info.attention.kv_groups]
            if info.mlp is not None and cfg.prunes("mlp", info.index):
                fams.append(info.mlp.channels)
    elif cfg.mode == "channel":
        fams.append(structure.hidden_family())
    else:
        fams += [structure.layer_family(info) for info in structure.layers if in_range(cfg.layers, info.index)]
    return fams
