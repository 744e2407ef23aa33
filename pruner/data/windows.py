"""What a text window starts with: the window protocol.

Two protocols cut a long text into windows of ``seq_len`` text tokens:

* ``"paper"``: the windows are the text's tokens and nothing else (LLM-Pruner's protocol; the
  figures its tables publish, e.g. LLaMA-7B's 12.62 on WikiText-2, were measured this way);
* ``"bos"``: each window starts with the tokenizer's BOS token, then the same ``seq_len`` text
  tokens (lm-eval's rolling windows do this): models trained to always see BOS first (Gemma,
  Llama 3) are only measured fairly, and calibrated on inputs they know, this way.

``"auto"`` (the default everywhere) is ``"bos"`` when the tokenizer adds a BOS token to what it
encodes and ``"paper"`` otherwise: a tokenizer that adds none (SmolLM2's, Qwen's) gets the same
windows as before the protocol existed. Perplexity scores the same predicted tokens under both
(tokens 1.. of each window's text), so the two differ only in the context the model sees.

Example:
    >>> import torch
    >>> with_bos(torch.tensor([[5, 6, 7]]), 1)
    tensor([[1, 5, 6, 7]])
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import PrunerError
from ..io.models import added_bos  # noqa: F401  (beside load_tokenizer: the GGUF export reads it too)

Protocol = Literal["auto", "paper", "bos"]
PROTOCOLS = ("auto", "paper", "bos")


def resolve_protocol(tokenizer, protocol: str = "auto") -> tuple[str, int | None]:
    """``(protocol, bos_id)``: ``"auto"`` resolved for ``tokenizer``; ``bos_id`` None under
    ``"paper"``."""
    if protocol not in PROTOCOLS:
        raise PrunerError(f"window protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {protocol!r}: "
                          "'paper' = no BOS in any window (LLM-Pruner's tables), 'bos' = each window starts with "
                          "BOS, 'auto' = 'bos' when the tokenizer adds one")
    if protocol == "paper":
        return "paper", None
    bos = added_bos(tokenizer)
    if protocol == "auto":
        return ("bos", bos) if bos is not None else ("paper", None)
    bos = bos if bos is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise PrunerError(f"window protocol 'bos' needs a BOS token, but {type(tokenizer).__name__} has none: use "
                          "'paper' (or 'auto')")
    return "bos", int(bos)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` ``(N, T)`` with ``bos`` in front of each, ``(N, 1 + T)``; as they are when
    ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)
