"""How the process's C allocator (glibc) treats freed memory: handed back to the operating system
between pruning phases, kept for reuse across training steps.

glibc's allocator raises its mmap threshold after the first large free, so later model-sized
temporaries (gradients, activations, sliced weights) come from the heap, which keeps them
resident after they are freed, and the resident peak of a pruning run grows well past what the
tensors need (benchmarks/prune_cost.py). ``release_freed_memory``
(``malloc_trim(0)``) hands the free heap pages back; it is called between the phases that free
large temporaries.

A training step is the opposite case: it frees and allocates the same large tensors (logits of
(B, T, vocab), gradients) again and again. glibc maps every block above its mmap threshold (at
most 32 MiB) afresh and unmaps it on free, so each step touches hundreds of thousands of new
pages and spends much of the step in the kernel. ``keep_freed_memory`` turns mmap and
automatic trimming off, so freed blocks are reused, for somewhat more resident memory
(docs/results.md, "Page faults", has the figures). ``python -m pruner
fit|validate|test|evaluate`` calls it on machines without a GPU (``PRUNER_KEEP_FREED_MEMORY=0``
leaves glibc's defaults).

Example:
    >>> release_freed_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``; musl has neither)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - AttributeError where they are missing
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Gives freed heap memory back to the system; False where the C library cannot (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for the process's next allocations instead of returning it
    to the system: no mmap for large blocks, no automatic trimming of the heap's top (the
    process-wide equivalent of ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``,
    settable after start-up). Meant for CPU training loops, whose steps free and allocate the
    same large tensors; ``release_freed_memory`` still hands free pages back when called. True
    when glibc took both settings, False where the C library is not glibc.

    Example (it changes the allocator of the whole process, so it is not run as a doctest):
        >>> from pruner.memory import keep_freed_memory
        >>> keep_freed_memory()  # doctest: +SKIP
        True
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))


def recomputing() -> bool:
    """Whether a forward pass runs inside a backward one: activation checkpointing recomputing
    a layer. Forward hooks that accumulate statistics skip it (they saw that forward already)."""
    import torch

    return torch._C._current_graph_task_id() != -1
