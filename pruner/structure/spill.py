"""A folder of files for the tensors an undo log keeps while a long operation runs.

The layer-by-layer refit changes one decoder layer after another inside one transaction: if any
later step fails, every layer goes back to its dense weights. What the undo needs (the removed
slabs, the blocks a refit replaced, the weights a regional fit replaced) grows with every layer
while the layers it came from no longer hold it, so in memory it would grow by about the removed
share of every walked layer. :class:`SpillFolder` keeps those tensors in files of a temporary
folder instead (``TMPDIR`` chooses where), read back only by a rollback, and deletes the folder
when the transaction ends either way. A process killed mid-walk cannot delete its folder: the next
one to spill deletes the folders of writers that are gone (:func:`pruner.tempfiles.remove_stale`:
our name, our marker and a dead pid must all agree).

Example:
    >>> import torch
    >>> folder = SpillFolder()
    >>> kept = folder.put(torch.arange(4.0))
    >>> kept.load().tolist()
    [0.0, 1.0, 2.0, 3.0]
    >>> folder.close()
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import PrunerError
from ..tempfiles import remove_stale, temporary_folder

FOLDER_NAME = "pruner-undo"  # the folders are TMPDIR/.pruner-undo.pruner-tmp-{pid}-{random}


@dataclass(frozen=True)
class SpilledTensor:
    """A tensor written to ``path``; :meth:`load` reads it back onto ``device``."""

    path: Path
    device: torch.device

    def load(self) -> torch.Tensor:
        # safetensors: a file of this folder holds a tensor and nothing that could run
        return load_file(self.path, device=str(self.device))["tensor"]


class SpillFolder:
    """Files of one transaction's undo data, in a folder made on the first :meth:`put`."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.bytes = 0
        self._count = 0
        self._cleanup = None

    def put(self, tensor: torch.Tensor) -> SpilledTensor:
        """Writes ``tensor`` to a new file; the caller drops its own reference afterwards."""
        if self.folder is None:
            parent = Path(tempfile.gettempdir())
            remove_stale(parent, FOLDER_NAME)  # left by killed walks: the disk they hold is ours to free
            try:
                self.folder = temporary_folder(parent, FOLDER_NAME)
            except OSError as err:
                raise _cannot_write(parent, err) from err
            # deleted with this object too, if the transaction is dropped without an end
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        path = self.folder / f"{self._count}.safetensors"
        self._count += 1
        try:
            save_file({"tensor": tensor.detach().contiguous()}, path)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise _cannot_write(self.folder, err) from err
        self.bytes += tensor.numel() * tensor.element_size()
        return SpilledTensor(path, tensor.device)

    def close(self) -> None:
        """Deletes the folder and every file in it."""
        if self._cleanup is not None:
            self._cleanup()
        self.folder, self._cleanup = None, None


def _cannot_write(folder: Path, err: OSError) -> PrunerError:
    return PrunerError(f"could not write the undo data of the layer-by-layer refit to {folder} ({err}): free space "
                       "there, or set TMPDIR to a folder with room (about the removed share of the pruned layers' "
                       "weights)")
