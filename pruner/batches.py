"""Token batches as the model runs them: normalised, checked before any forward pass, and split
into micro-batches for backward passes.

A batch is an ``input_ids`` tensor ``(B, T)`` or a dict holding ``input_ids`` (and optionally
``attention_mask``, ``labels``): :func:`as_batch` makes it a dict on the model's device with
``labels`` (``input_ids`` for plain text), :func:`check_inputs` refuses what the model cannot run
or learn from, naming the fix.

Example:
    >>> import torch
    >>> sorted(as_batch(torch.tensor([1, 2, 3]), "cpu"))
    ['input_ids', 'labels']
"""

from __future__ import annotations

import torch

from .errors import PrunerError


def as_batch(batch, device) -> dict[str, torch.Tensor]:
    """``batch`` as a dict of ``(B, T)`` tensors on ``device``: integer ids widened to int64, a 1-d
    sample given a batch dimension, ``labels`` = ``input_ids`` unless given."""
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


def micro_batches(batch: dict[str, torch.Tensor], per_sample: bool, max_tokens: int | None):
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
