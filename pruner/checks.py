"""Typed checks of user options, with messages that name the option, the value, its type and a fix.

Values arrive from Python, YAML and command lines: ``"0.2"``, ``"false"``, ``nan`` and ``True``
(an ``int`` to Python) must be refused before any work, not compared, cast or silently accepted.

Example:
    >>> check_fraction("target_sparsity", "0.2")
    Traceback (most recent call last):
    ...
    pruner.errors.PrunerError: target_sparsity must be a number strictly between 0 and 1, got '0.2' (a str): pass a fraction such as 0.2
"""

from __future__ import annotations

import math

from .errors import PrunerError


def _got(value) -> str:
    kind = type(value).__name__
    return f"got {value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def plain(value):
    """A NumPy (or other array-library) scalar as the Python number it holds, so that options from
    ``np.float32(0.2)`` or ``np.int64(2)`` check, compare and serialise like 0.2 and 2; anything
    else as it is.

    Example:
        >>> import numpy as np
        >>> plain(np.float64(0.25)), plain(np.int64(3)), plain("a")
        (0.25, 3, 'a')
    """
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return value


def is_number(value) -> bool:
    """A real int or float; ``bool`` is not a number here (``True`` would pass as 1)."""
    value = plain(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise PrunerError(f"{name} must be true or false, {_got(value)}: write true/false (YAML) or True/False "
                          "(Python), not a string")
    return value


def check_int(name: str, value, minimum: int | None = None, fix: str = "") -> int:
    """An integer (not a bool, not a float such as 2.0) of at least ``minimum``; returned as a Python int."""
    value = plain(value)
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        want = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise PrunerError(f"{name} must be {want}, {_got(value)}" + (f": {fix}" if fix else ""))
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, fix: str = "") -> float:
    """A finite number within ``[low, high]`` (an end is excluded when ``*_open``)."""
    value = plain(value)
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            if low_open and high_open:
                want = f"a number strictly between {low:g} and {high:g}"
            else:
                want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            want = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            want = "a finite number"
        raise PrunerError(f"{name} must be {want}, {_got(value)}" + (f": {fix}" if fix else ""))
    return float(value)


def check_fraction(name: str, value) -> float:
    """A fraction strictly between 0 and 1 (target_sparsity, pruning_ratio)."""
    return check_number(name, value, 0.0, 1.0, low_open=True, high_open=True, fix="pass a fraction such as 0.2")


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise PrunerError(f"{name} must be one of {listed}, {_got(value)}")
    return value


def existing_ancestor(path) -> "Path":
    """``path`` itself or its nearest existing parent folder (where a new folder would be made)."""
    from pathlib import Path

    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def check_writable_folder(name: str, path, fix: str = "choose a folder you can write to") -> "Path":
    """Refuses, before any work, a folder path that is a file or could not be created/written;
    returns it (``~`` expanded, absolute)."""
    import os
    from pathlib import Path

    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise PrunerError(f"{name} {folder} is an existing file: give a folder")
    existing = existing_ancestor(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PrunerError(f"{name} {folder}: {existing} is not a writable folder; {fix}")
    return folder


def check_model(value, what: str = "model"):
    """A ``torch.nn.Module`` (a transformers causal LM), not a name or a path."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise PrunerError(f"{what} must be a torch.nn.Module (a transformers causal LM), got {type(value).__name__}: "
                          "load it first, e.g. model, tokenizer = pruner.load_model('smollm2')")
    return value


def check_finite_weights(model) -> None:
    """Refuses a model holding NaN/inf weights (a damaged checkpoint, an fp16 overflow), naming the
    first such parameter, before any pass could blame the data for them.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad(): layer.weight[0, 0] = float("nan")
        >>> check_finite_weights(layer)
        Traceback (most recent call last):
        ...
        pruner.errors.PrunerError: weight holds NaN/inf values: the model itself is broken (a damaged checkpoint, or weights that overflowed in a float16 conversion); load it again in float32 or bfloat16
    """
    for name, p in model.named_parameters():
        check_finite_tensor(name, p)


def check_finite_tensor(name: str, tensor) -> None:
    """Refuses one weight holding NaN/inf values (:func:`check_finite_weights`, tensor by tensor)."""
    import torch

    with torch.no_grad():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise broken_weight(name)


def broken_weight(name: str) -> PrunerError:
    """The refusal of weight ``name`` holding NaN/inf values."""
    return PrunerError(f"{name} holds NaN/inf values: the model itself is broken (a damaged checkpoint, or weights "
                       "that overflowed in a float16 conversion); load it again in float32 or bfloat16")


def check_dtype(value):
    """A floating-point ``torch.dtype`` or its name ('float32', 'bfloat16', 'float16'); returns the dtype."""
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in (torch.float8_e4m3fn,
                                                                                    torch.float8_e5m2):
        raise PrunerError(f"dtype={value!r} is not a floating-point dtype: use 'float32', 'bfloat16' or 'float16'")
    return dtype


def check_device(name: str, value, allow_auto: bool = False):
    """A CPU or CUDA device that torch can use here, as ``torch.device``: refuses, before any model
    loads, a name that is not a device, another device type, and a GPU that torch cannot see
    (a CPU build of torch, or ``cuda:3`` on a machine with two). ``"auto"`` (when allowed) is the
    first GPU when torch sees one, else the CPU.

    Example:
        >>> check_device("device", "cpu")
        device(type='cpu')
        >>> check_device("device", "gpu0")
        Traceback (most recent call last):
        ...
        pruner.errors.PrunerError: device 'gpu0' is not a device: use 'cpu', 'cuda' or 'cuda:N'
    """
    import torch

    choices = ("'auto', " if allow_auto else "") + "'cpu', 'cuda' or 'cuda:N'"
    if allow_auto and value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise PrunerError(f"{name} {value!r} is not a device: use {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise PrunerError(f"{name} {value!r}: pruner runs models on the CPU or a CUDA GPU; use {choices}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PrunerError(f"{name} {value!r}: torch {torch.__version__} sees no GPU; use 'cpu', or install a "
                              "CUDA build of torch")
        if device.index is not None and device.index >= count:
            raise PrunerError(f"{name} {value!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def current_umask() -> int:
    """The process's umask (read by setting and restoring it): files this package creates with
    ``mkstemp``/``mkdtemp`` (0600/0700) get ``0o666 & ~umask`` like any other file."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask
