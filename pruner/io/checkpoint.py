"""The one place checkpoints are read: tensors and plain data only, so that no file we load runs code.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mktemp(suffix=".ckpt"); torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    >>> read_checkpoint(path)["state_dict"]["w"].tolist()
    [1.0]
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..errors import PrunerError


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A ``torch.save`` checkpoint (a Lightning ``.ckpt``) read as tensors and plain data only
    (``torch.load(weights_only=True)``): nothing in the file can run code while it loads. A file
    that holds other objects is refused, naming the way to load it when its author is trusted.
    ``mmap``: the tensors are mapped from the file, read only where touched (to read the rest of
    a large checkpoint)."""
    if not isinstance(path, (str, os.PathLike)):
        raise PrunerError(f"the checkpoint path must be a path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise PrunerError(
            f"{path} holds objects other than tensors and plain data ({detail}), and pruner never unpickles "
            "those: they can run code as they load. If you wrote this file yourself and trust it, load it with "
            "torch.load(path, weights_only=False) and pass the resulting dict instead of the path") from None
    except Exception as err:  # noqa: BLE001 - any other failure to parse: not a torch.save file
        raise PrunerError(f"{path} is not a torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}): "
                          "pass a .ckpt file written by Lightning (trainer.save_checkpoint or ModelCheckpoint)") from None
    if not isinstance(checkpoint, dict):
        raise PrunerError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict: pass a .ckpt file "
                          "written by Lightning")
    return checkpoint
