"""A model's parameters: counted (tied weights once) and fingerprinted (which dense model a plan fits).

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> count_parameters(tiny_causal_lm("llama"))
    108992
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..checks import check_model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (shared tensors) are counted once."""
    check_model(model)
    # model.parameters() already de-duplicates shared Parameters (tied embeddings).
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_fingerprint(model) -> str:
    """A cheap, deterministic fingerprint of a model: parameter names, shapes and the first
    values of each, rounded to bfloat16 so that the same weights in fp32, bf16 or fp16 agree.
    A model sharded by FSDP2 gets its unsharded copy's fingerprint (each parameter is gathered
    in turn: collective, every rank must call it)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a DTensor's first values may sit on any rank
        flat = full.detach().reshape(-1)
        h.update(flat[: min(8, flat.numel())].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
