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

import contextlib
import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..batches import MICRO_BATCH_TOKENS, as_batch, micro_batches
from ..config import PruneConfig
from ..errors import PrunerError
from ..importance import CRITERIA, ImportanceEstimator
from ..memory import release_freed_memory
from ..refit.statistics import GramCollector
from ..selection import in_range
from ..structure import ModelStructure
from ..structure.layers import find_layer_stack

Reduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # sums every tensor over ranks


@contextmanager
def checkpointed_layers(model: nn.Module):
    """While open, each decoder layer runs under non-reentrant ``torch.utils.checkpoint``: a
    backward keeps only the layers' inputs and recomputes each layer's inside when its gradient
    is due (one more forward pass; activation memory of one layer instead of all of them)."""
    _, layers = find_layer_stack(model)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward, if any
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def estimate_importance(model: nn.Module, batches: list, structure: ModelStructure, cfg: PruneConfig,
                        progress: bool = False, collector: GramCollector | None = None,
                        reduce: Reduce | None = None, max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS,
                        activation_checkpointing: bool = False):
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
    produced and nothing of model size is kept beyond the backward's own activations.
    ``activation_checkpointing``: the backward keeps only each decoder layer's input and
    recomputes the layer (:func:`checkpointed_layers`; the same scores, one more forward pass),
    so the activations no longer grow with the depth."""
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
    # not under checkpointing, whose forward hooks would keep every linear's input until its backward.
    # one_pass: one backward, reduced as it comes (not when ranks must sum the gradients first)
    est = ImportanceEstimator(model, families, cfg.criterion, cfg.seed, direct_linear=not activation_checkpointing,
                              one_pass=passes == 1 and reduce is None)
    checkpointing = activation_checkpointing and est.criterion.needs_gradients
    if not (CRITERIA[cfg.criterion].needs_gradients or CRITERIA[cfg.criterion].needs_activations) and collector is None:
        return est.vectors()
    was_training = model.training
    model.eval()  # no dropout: importance of the deterministic model
    est.attach()
    if collector is not None:
        collector.attach()
    release_freed_memory()  # what discovery and loading freed: the running sums are allocated now
    try:
        with checkpointed_layers(model) if checkpointing else contextlib.nullcontext():
            run_calibration(model, batches, est, max_tokens_per_backward, progress, checkpointing)
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


def run_calibration(model: nn.Module, batches: list[dict[str, torch.Tensor]], est: ImportanceEstimator,
                    max_tokens_per_backward: int | None, progress: bool, checkpointing: bool) -> None:
    """The calibration passes, each micro-batch announced to ``est`` before its backward."""
    # a KV cache would be appended to again by every recomputed layer; none is needed here
    no_cache = {"use_cache": False} if checkpointing else {}
    for batch in tqdm(batches, desc="calibration", disable=not progress):
        for part, samples, weight in micro_batches(batch, est.criterion.needs_per_sample, max_tokens_per_backward):
            est.begin_batch(samples, weight)
            if est.criterion.needs_gradients:
                loss = model(**part, **no_cache).loss
                if not torch.isfinite(loss):
                    raise PrunerError("calibration loss is NaN/inf: check the data and the model's dtype")
                loss.backward()
            else:
                with torch.no_grad():
                    model(**{k: v for k, v in part.items() if k != "labels"})
            # (no trim between backwards: the next one reuses the same blocks; trimming would
            # only make it fault the pages in again)


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
