"""Runs one measurement in a fresh Python process (no allocator caches or imports carried
over from the previous one) and returns the JSON line it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# glibc: return freed blocks above 64 KiB to the system at once, so that the resident set tracks the
# live tensors (the default threshold grows after the first large free; see prune_cost.py)
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(script: str, args: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    """``python script *args`` (with ``env`` added to the environment); the dict it printed as
    its last ``{...}`` line, or ``{"error": ...}`` (a timeout, or the last line of stderr)."""
    try:
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])
