"""Temporary siblings of what we write (an export folder, a GGUF file), named so that no file of
the user's matches them and cleaned up only when they are provably ours and their writer is gone.

A temporary folder is ``.{name}.pruner-tmp-{pid}-{random}`` and holds a marker file naming its
target; a temporary file has the same name pattern and must start with the magic bytes of what we
write (``GGUF``). :func:`remove_stale` deletes a sibling only when the name, the marker (or the
magic bytes) and a dead writer all agree, so a folder the user happened to name alike stays.

Example:
    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> tmp = temporary_folder(parent, "export")
    >>> tmp.name.startswith(".export.pruner-tmp-"), (tmp / MARKER).is_file()
    (True, True)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".pruner-temporary"  # inside a temporary folder: {"target": name, "pid": writer}


def _prefix(name: str) -> str:
    return f".{name}.pruner-tmp-{os.getpid()}-"


def temporary_folder(parent: Path, name: str) -> Path:
    """A new private folder beside ``parent / name``, marked as ours."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=_prefix(name)))
    (folder / MARKER).write_text(json.dumps({"target": name, "pid": os.getpid()}))
    return folder


def temporary_file(parent: Path, name: str, suffix: str = "") -> Path:
    """A new empty private file beside ``parent / name``."""
    fd, path = tempfile.mkstemp(dir=parent, prefix=_prefix(name), suffix=suffix)
    os.close(fd)
    return Path(path)


def writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, owned by someone else
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _writer(path: Path, name: str) -> int | None:
    """The pid in a temporary sibling's name, None when the name is not one of ours."""
    rest = path.name.removeprefix(f".{name}.pruner-tmp-")
    if rest == path.name:
        return None
    pid = rest.split("-")[0]
    return int(pid) if pid.isdigit() else None


def is_ours(path: Path, name: str, magic: bytes | None = None) -> bool:
    """Whether ``path`` is a temporary sibling of ``name`` that this package wrote: our name
    pattern and, for a folder, our marker naming ``name``; for a file, ``magic`` at its start
    (or nothing written yet)."""
    if _writer(path, name) is None or path.is_symlink():
        return False
    if path.is_dir():
        try:
            return json.loads((path / MARKER).read_text()).get("target") == name
        except (OSError, ValueError, AttributeError):
            return False
    if path.is_file() and magic is not None:
        with open(path, "rb") as f:
            head = f.read(len(magic))
        return head in (magic, b"")
    return False


def remove_stale(parent: Path, name: str, magic: bytes | None = None) -> list[Path]:
    """Deletes temporary siblings of ``parent / name`` that are ours and whose writer is gone
    (a killed export); a live concurrent writer's and every other path stay. Returns them."""
    removed = []
    for path in parent.glob(f".{name}.pruner-tmp-*"):
        pid = _writer(path, name)
        if pid is None or writer_alive(pid) or not is_ours(path, name, magic):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
