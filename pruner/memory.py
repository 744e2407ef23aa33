"""Returning freed memory to the operating system (glibc), so that the resident set follows the
tensors that are alive.

glibc's allocator raises its mmap threshold after the first large free, so later model-sized
temporaries (gradients, activations, sliced weights) come from the heap, which keeps them
resident after they are freed: the resident peak of a pruning run then ran 1.4-2.3x the
weights where the tensors needed 0.9x (benchmarks/prune_cost.py). ``malloc_trim(0)`` hands the
free heap pages back; it is called between the phases that free large temporaries.

Example:
    >>> release_freed_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Gives freed heap memory back to the system; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
