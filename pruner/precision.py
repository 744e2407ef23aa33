"""Whether a device computes in bfloat16 with its own units or emulates it.

bf16 halves the memory of weights and activations everywhere, but it is only *faster* where the
hardware multiplies bf16 matrices: GPUs from Ampere on, x86 CPUs with AMX or AVX512-BF16, Arm
CPUs with the BF16 extension. Elsewhere oneDNN converts every operand to float32 and back, and a
bf16 matrix product runs several times slower than the float32 one (``benchmarks/bf16_speed.py``
prints the table for the machine it runs on; figures in ``docs/results.md``). The pipeline warns
once per process and device when it is asked for bf16 on such a device
(:func:`warn_if_bf16_is_emulated`).

Example:
    >>> import torch
    >>> from pruner.precision import bf16_units
    >>> bf16_units("cpu")  # doctest: +SKIP
    'AMX, AVX512-BF16'
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import torch

_warned: set[str] = set()


def _arm_cpu_has_bf16() -> bool | None:
    """The ``bf16`` feature of a Linux Arm CPU (None where /proc/cpuinfo does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    features = [line.split(":", 1)[1].split() for line in text.splitlines() if line.lower().startswith("features")]
    return any("bf16" in f for f in features) if features else None


def bf16_units(device: torch.device | str = "cpu") -> str | None:
    """The units that compute bf16 matrix products on ``device`` (a description), ``""`` where
    bf16 is known to be emulated, None where this cannot be told (other accelerators, macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        # bf16 tensor cores from compute capability 8.0 (Ampere) on; before, bf16 is emulated
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})" if major >= 8 else ""
    if device.type != "cpu":
        return None
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        found = [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
        return ", ".join(found)
    if machine in ("aarch64", "arm64"):
        has = _arm_cpu_has_bf16()
        return None if has is None else ("Arm BF16" if has else "")
    return None


def warn_if_bf16_is_emulated(device: torch.device | str, what: str, fix: str) -> bool:
    """Warns that ``what`` asks for bf16 on a device that emulates it, once per process and device
    (the first caller names the cause: under the callback, the trainer's precision before the
    model's dtype); returns whether it is emulated there. ``fix`` says what to use instead."""
    device = torch.device(device)
    if bf16_units(device) != "":
        return False
    if str(device) not in _warned:
        _warned.add(str(device))
        hardware = ("this CPU has no AMX, AVX512-BF16 or Arm BF16 units" if device.type == "cpu"
                    else f"{device} has no bf16 tensor cores (compute capability below 8.0)")
        warnings.warn(f"{what} computes in bfloat16, but {hardware}: every bf16 matrix product is converted to "
                      f"float32 and back, several times slower than float32 itself; {fix}", stacklevel=3)
    return True
