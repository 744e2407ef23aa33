"""``pruner.prune``: calibration -> importance -> selection -> exact removal, in one call.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    >>> plan = prune(model, batches, target_sparsity=0.2, global_ranking=True)
    >>> round(plan.params["removed_fraction"], 2)  # of ALL parameters, embeddings included
    0.2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_int, check_model
from .config import PruneConfig
from .discovery import ModelStructure, discover
from .errors import PrunerError
from .eval.efficiency import count_parameters  # one definition: tied weights counted once
from .importance import ImportanceEstimator
from .memory import release_freed_memory
from .pipeline import StepHooks, compose, finish_plan, make_plan, package_version, prune_steps, step_config
from .plan import Plan, model_fingerprint
from .reconstruction import GramCollector, consumers
from .regional import target_modules
from .selection import in_range

Reduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # sums every tensor over ranks

__all__ = ["check_inputs", "collect_inputs", "collect_output_fisher", "compose", "count_parameters", "estimate_importance", "families_for", "finish_plan",
           "make_plan", "package_version", "prune", "step_config"]


def _as_batch(batch, device) -> dict[str, torch.Tensor]:
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise PrunerError("calibration batches must be input_ids tensors (B, T) or dicts holding 'input_ids', got "
                          f"{type(batch).__name__}")
    ids = batch["input_ids"]
    if not torch.is_tensor(ids):
        raise PrunerError(f"calibration input_ids must be a tensor of token ids, got {type(ids).__name__}: "
                          "tokenize the text first (e.g. pruner.data.calibration_samples)")
    if ids.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        ids = ids.long()  # any integer ids (the embedding takes int64); floats are refused by check_inputs
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise PrunerError(f"calibration input_ids must have shape (batch, tokens >= 2), got {tuple(ids.shape)}")
    out = {"input_ids": ids.to(device)}
    for key in ("attention_mask", "labels"):
        value = batch.get(key)
        if value is not None and not torch.is_tensor(value):
            raise PrunerError(f"calibration {key} must be a tensor shaped like input_ids, got {type(value).__name__}")
        if value is not None and value.dim() == 1 and batch["input_ids"].dim() == 1:
            value = value.unsqueeze(0)
        if value is not None:
            out[key] = value.to(device)
    out.setdefault("labels", out["input_ids"])
    return out


def check_inputs(batch: dict[str, torch.Tensor], config, what: str = "calibration batch") -> None:
    """Refuses, before any forward pass, token batches the model cannot run or learn from:
    non-integer ids, ids outside the vocabulary, sequences longer than the model's positions,
    masks or labels shaped unlike ``input_ids``, no token to predict (all padding / all -100).

    Example:
        >>> from types import SimpleNamespace
        >>> check_inputs({"input_ids": torch.tensor([[1, 200]])}, SimpleNamespace(vocab_size=128))
        Traceback (most recent call last):
        ...
        pruner.errors.PrunerError: calibration batch: token id 200 is outside the model's vocabulary (0..127): tokenize with the model's own tokenizer
    """
    ids = batch["input_ids"]
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PrunerError(f"{what}: input_ids must be integer token ids, got dtype {ids.dtype}: tokenize the text "
                          "with the model's tokenizer (e.g. pruner.data.calibration_samples)")
    vocab = getattr(config, "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        bad = low if low < 0 else high
        raise PrunerError(f"{what}: token id {bad} is outside the model's vocabulary (0..{vocab - 1}): tokenize "
                          "with the model's own tokenizer")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and ids.shape[-1] > positions:
        raise PrunerError(f"{what}: {ids.shape[-1]} tokens per sample, more than the model's "
                          f"max_position_embeddings={positions}: use shorter windows (e.g. seq_len=64)")
    for key in ("attention_mask", "labels"):
        value = batch.get(key)
        if value is not None and tuple(value.shape) != tuple(ids.shape):
            raise PrunerError(f"{what}: {key} has shape {tuple(value.shape)}, input_ids {tuple(ids.shape)}: they "
                              "must match (one entry per token)")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask != 0).any()):
        raise PrunerError(f"{what}: attention_mask is all zeros (every token is padding): drop empty samples")
    labels = batch.get("labels", ids)
    scored = labels[:, 1:] != -100
    if mask is not None:
        scored &= mask[:, 1:] != 0
    if not bool(scored.any()):
        raise PrunerError(f"{what}: no token to predict (every label is -100 or padding), so the loss is undefined: "
                          "give the batch labels of real tokens (labels = input_ids for plain text)")


# Tokens per backward pass (whole samples): the activations kept for backward grow with them (SmolLM2:
# 1.4 MB per token, 0.17x its weights at 64 tokens), so a large calibration batch is run in micro-batches
# of this many tokens: memory does not depend on how the calibration samples are batched.
MICRO_BATCH_TOKENS = 64


def _micro_batches(batch: dict[str, torch.Tensor], per_sample: bool, max_tokens: int | None):
    """``(micro-batch, samples, weight)`` for each backward: the batch split into chunks of at
    most ``max_tokens`` tokens (whole samples; one sample each for per-sample criteria), each
    weighted by its share of the batch's labelled tokens times the batch size, so that the
    summed gradients equal the whole batch's, whatever the split."""
    n, seq_len = batch["input_ids"].shape
    size = 1 if per_sample else n if max_tokens is None else max(1, min(n, max_tokens // seq_len))
    if size >= n:
        yield batch, n, None
        return
    labelled = (batch["labels"][:, 1:] != -100).sum(1).double()  # (n,) tokens the loss averages over
    total = float(labelled.sum())
    for start in range(0, n, size):
        part = {k: v[start: start + size] for k, v in batch.items()}
        yield part, len(part["input_ids"]), n * float(labelled[start: start + size].sum()) / max(total, 1.0)


def estimate_importance(model: nn.Module, batches: list, structure: ModelStructure, cfg: PruneConfig,
                        progress: bool = False, collector: GramCollector | None = None,
                        reduce: Reduce | None = None, max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS):
    """Runs the calibration batches and returns the per-index salience vectors. A ``collector``
    (for ``reconstruct``) records the consumers' input statistics during the same passes.
    ``reduce`` sums the accumulators over ranks (each rank ran its own batches) before the
    vectors are computed from them (they are not linear in the gradient sums).
    ``max_tokens_per_backward``: each backward runs on at most this many tokens (whole samples),
    so memory does not grow with the calibration batch (the scores are those of the whole
    batch); None = one backward per batch (faster for large batches, more memory)."""
    if not isinstance(cfg, PruneConfig):
        raise PrunerError(f"cfg must be a pruner.PruneConfig, got {type(cfg).__name__}: e.g. PruneConfig(criterion="
                          f"{cfg!r}, target_sparsity=0.2)" if isinstance(cfg, str) else
                          f"cfg must be a pruner.PruneConfig, got {type(cfg).__name__}")
    if batches is None or isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise PrunerError(f"batches must be an iterable of calibration batches, got {type(batches).__name__}")
    families = families_for(structure, cfg)
    # direct_linear: plain autograd here (the Lightning callback, under DDP/FSDP/autocast, keeps .grad hooks)
    est = ImportanceEstimator(model, families, cfg.criterion, cfg.seed, direct_linear=True)
    if cfg.criterion in ("l1", "l2", "random") and collector is None:
        return est.vectors()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: importance of the deterministic model
    est.attach()
    if collector is not None:
        collector.attach()
    release_freed_memory()  # what discovery and loading freed: the running sums are allocated now
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            batch = _as_batch(batch, device)
            for part, samples, weight in _micro_batches(batch, est.criterion.needs_per_sample,
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


class _StopForward(Exception):
    """Raised by :class:`_StopAt` once a forward pass has given all its statistics."""


class _StopAt:
    """A forward hook (pre or post) that ends the forward pass at the ``calls``-th call of its module."""

    def __init__(self, calls: int):
        self.calls, self.seen = calls, 0

    def __call__(self, module: nn.Module, args, *output) -> None:
        self.seen += 1
        if self.seen == self.calls:
            self.seen = 0
            raise _StopForward


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: list, collector: GramCollector, progress: bool = False,
                   stop_early: bool = True) -> None:
    """Forward passes only: the consumers' input statistics for ``reconstruct``.

    ``stop_early``: after the first batch, each forward pass ends at the input of the consumer
    it reaches last (what follows, e.g. the last layers and the LM head, computes nothing the
    statistics need: SmolLM2's vocabulary projection alone is a fifth of a forward pass; with
    ``collector.output_modules`` at the output of the last of those it reaches). Pass
    False where the forward pass must run to its end (under FSDP2 each module reshards its
    parameters in a hook after its forward).

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> collector = GramCollector(model, ["model.layers.0.mlp.down_proj"])
        >>> collect_inputs(model, [torch.randint(0, 100, (2, 8))] * 2, collector)
        >>> collector.tokens["model.layers.0.mlp.down_proj"]  # 2 batches of 2 x 8
        32
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # the consumers (inputs) and recorded modules (outputs) in the order the first forward pass reaches them
    reached: list[tuple[str, bool]] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: reached.append((name, False))) for name in collector.names] if stop_early else []
    handles += [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: reached.append((name, True)))
        for name in collector.output_modules] if stop_early else []
    collector.attach()
    try:
        for i, batch in enumerate(tqdm(batches, desc="reconstruction inputs", disable=not progress)):
            batch = _as_batch(batch, device)
            if i == 1 and reached:  # registered after the collector's hooks: it raises once they have summed
                for h in handles:
                    h.remove()
                last, at_output = reached[-1]
                module, stop = model.get_submodule(last), _StopAt(reached.count(reached[-1]))
                handles = [module.register_forward_hook(stop) if at_output else module.register_forward_pre_hook(stop)]
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"})
            except _StopForward:
                pass
    finally:
        collector.detach()
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_output_fisher(model: nn.Module, batches: list, collector: GramCollector, max_samples: int) -> None:
    """Backward passes of the next-token loss over the first ``max_samples`` sequences of
    ``batches``, down to the outputs of ``collector``'s modules, for ``mlp_selection="obs-fisher"``:
    ``collector.fisher[name] += Σ_tokens (∂L/∂y)²`` per output ``y`` of each module, ``L`` the loss
    summed over the predicted tokens. The gradients are taken with respect to those outputs only:
    no weight gradient is computed and no ``.grad`` changes.

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> collector = GramCollector(model, ["model.layers.1.mlp.down_proj"])
        >>> collect_output_fisher(model, [torch.randint(0, 100, (4, 16))], collector, max_samples=2)
        >>> collector.fisher_tokens["model.layers.1.mlp.down_proj"]  # 2 sequences of 16 tokens
        32
    """
    device = next(model.parameters()).device
    outputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out)) for name in collector.names]
    # embeddings that need a gradient: a graph to the outputs even where every weight is frozen. A hook
    # rather than calling the embedding ourselves: under FSDP2 its weight is whole only inside the
    # model's own forward
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_()))  # (B, T, d)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if seen >= max_samples:
                break
            batch = _as_batch(batch, device)
            take = min(max_samples - seen, batch["input_ids"].shape[0])
            part = {k: v[:take] for k, v in batch.items()}
            with torch.enable_grad():
                logits = model(input_ids=part["input_ids"], attention_mask=part.get("attention_mask")).logits  # (B, T, V)
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), part["labels"][:, 1:].flatten(),
                                                   ignore_index=-100, reduction="sum")
                if not torch.isfinite(loss):
                    raise PrunerError("the loss of the Fisher passes is NaN/inf: check the refit's text and the "
                                      "model's dtype, or use mlp_selection='obs'")
                names = [name for name in collector.names if name in outputs]
                grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
            mask = part.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else part["input_ids"].numel()
            for name, grad in zip(names, grads):
                if grad is None:  # the output does not reach the loss
                    continue
                sq = grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(0)  # (out,)
                collector.fisher[name] = sq if name not in collector.fisher else collector.fisher[name].add_(sq)
                collector.fisher_tokens[name] = collector.fisher_tokens.get(name, 0) + tokens
            outputs.clear()
            del logits, loss, grads
            seen += take
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


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


def prune(
    model: nn.Module,
    batches: Iterable,
    *,
    criterion: str = "element1",
    aggregation: str = "sum",
    mode: str = "block",
    target_sparsity: float | None = None,
    pruning_ratio: float | None = None,
    attention_layers: tuple[int, int] | None = None,
    mlp_layers: tuple[int, int] | None = None,
    progress: bool = False,
    reconstruction_batches: Iterable | None = None,
    max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS,
    **more,
) -> Plan:
    """Prunes ``model`` in place and returns the :class:`Plan` (indices of the dense model).

    ``batches``: input_ids tensors (B, T) or dicts holding ``input_ids``. ``target_sparsity``:
    fraction of total parameters to remove; ``pruning_ratio``: the paper's per-structure ratio.
    ``attention_layers`` / ``mlp_layers``: half-open layer ranges. Further options are the
    fields of :class:`pruner.config.PruneConfig` (``layers``, ``head_granularity``,
    ``global_ranking``, ``max_layer_ratio``, ``round_to``, ``iterative_steps``, ``seed``,
    ``reconstruct``, ``reconstruct_damping``, ``attention_selection``, ``mlp_selection``,
    ``regional_epochs``, ``regional_lr``).
    ``reconstruction_batches``: with ``reconstruct``, the inputs whose statistics the refit uses
    (forward passes only, so many more tokens than the calibration batches are affordable);
    None = the calibration batches. ``max_tokens_per_backward``: calibration batches run in
    backward passes of at most this many tokens (whole samples; the scores are the whole
    batch's), which bounds the memory; None = one backward per batch.
    Every argument is checked before the model is touched, and a failure at any later point
    leaves the model as it was.
    """
    check_model(model)
    if max_tokens_per_backward is not None:
        check_int("max_tokens_per_backward", max_tokens_per_backward, 1, fix="or None for one backward per batch")
    if batches is None or isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise PrunerError(f"batches must be an iterable of calibration batches (input_ids tensors or dicts), got "
                          f"{type(batches).__name__}: e.g. [pruner.data.calibration_samples(...)]")
    unknown = set(more) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise PrunerError(f"unknown prune() option(s) {sorted(unknown)}; valid: {sorted(PruneConfig.__dataclass_fields__)}")
    cfg = PruneConfig(criterion=criterion, aggregation=aggregation, mode=mode, target_sparsity=target_sparsity,
                      pruning_ratio=pruning_ratio, attention_layers=attention_layers, mlp_layers=mlp_layers, **more)
    device = next(model.parameters()).device
    batches = [_as_batch(b, device) for b in batches]  # validated and normalised once, up front
    for i, b in enumerate(batches):
        check_inputs(b, model.config, f"calibration batch {i}")
    extra = list(reconstruction_batches) if reconstruction_batches is not None else None
    if extra is not None and not cfg.reconstruct:
        raise PrunerError("reconstruction_batches are only used with reconstruct=True: set it, or drop them")
    if extra is not None and not extra:
        raise PrunerError("reconstruction_batches is empty: pass input_ids batches, or None to reuse the calibration")
    for i, b in enumerate(extra or []):
        check_inputs(_as_batch(b, "cpu"), model.config, f"reconstruction batch {i}")
    if not batches and extra is None and cfg.mlp_selection == "obs-fisher":
        raise PrunerError("mlp_selection='obs-fisher' runs backward passes over the refit's text: pass calibration "
                          "batches or reconstruction_batches, or use mlp_selection='obs'")
    if not batches and cfg.criterion not in ("l1", "l2", "random"):
        raise PrunerError(f"no calibration batches: criterion {cfg.criterion!r} needs at least one; pass "
                          "input_ids batches, or use a data-free criterion (l1, l2, random)")
    dense_structure = discover(model, seed=cfg.seed)
    cfg.check_model(len(dense_structure.layers))
    total_before = count_parameters(model)
    fingerprint = model_fingerprint(model)

    def estimate(model: nn.Module, structure: ModelStructure, step_cfg: PruneConfig):
        outputs = target_modules(structure, cfg) if cfg.regional_epochs else None  # the regional fit's targets
        collector = GramCollector(model, consumers(structure, cfg), outputs) if cfg.reconstruct else None
        vectors = estimate_importance(model, batches, structure, step_cfg, progress,
                                      collector if extra is None else None,
                                      max_tokens_per_backward=max_tokens_per_backward)
        if collector is not None and extra is not None:
            collect_inputs(model, extra, collector, progress)
        if cfg.mlp_selection == "obs-fisher":  # the output Fisher from the refit's text
            collect_output_fisher(model, extra if extra is not None else batches, collector, cfg.fisher_samples)
        return vectors, collector

    text = [_as_batch(b, device) for b in extra] if extra is not None else batches  # what the statistics pass runs
    hooks = StepHooks(estimate=estimate, refine_batches=batches, regional_batches=text if cfg.regional_epochs else [])
    plan = prune_steps(model, dense_structure, cfg, hooks)
    calibration = {"batches": len(batches), "samples": sum(b["input_ids"].shape[0] for b in batches),
                   "tokens_per_sample": int(batches[0]["input_ids"].shape[1]) if batches else 0}
    if extra is not None:
        calibration["reconstruction_tokens"] = sum(_as_batch(b, "cpu")["input_ids"].numel() for b in extra)
    return finish_plan(plan, model, dense_structure, fingerprint, total_before, cfg, calibration)
