"""Saving and loading pruned models: safetensors + config + plan, atomically, without pickle.

Example:
    >>> save_pretrained(model, "out/smollm2-pruned", tokenizer=tokenizer, plan=plan)  # doctest: +SKIP
    >>> model = load_pretrained("out/smollm2-pruned")  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from torch import nn

from ..checks import check_device, check_dtype, check_model, current_umask, existing_ancestor
from ..errors import PrunerError
from ..recovery.lora import check_merged
from ..structure import Plan, shapes
from .shards import write_weights
from .integrity import check_config, check_plan, check_shards, check_weight_shapes, config_record, meta_skeleton
from ..tempfiles import MARKER, remove_stale, temporary_folder
from ..structure.spec import base_class, clean_config, shape_spec, uniform_config
from ..version import package_version

MODELING_FILE = "modeling_pruned.py"


def _modeling_source(base: type) -> str:
    source = Path(shapes.__file__).read_text()
    return (source + f"\n\nfrom transformers import {base.__name__}\n\n\n"
            f"class Pruned{base.__name__}(pruned_class({base.__name__})):\n"
            f'    """{base.__name__} with per-layer widths from ``config.pruner_shapes`` (written by pruner)."""\n')


EXPORT_MARKER = "pruner_export"  # config.json key that marks a folder as written by save_pretrained


def is_pruner_export(folder: Path) -> bool:
    """Whether ``folder`` holds an export of this package (its config.json carries the marker, or,
    for exports of older versions, per-layer widths or a pruning plan)."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and (EXPORT_MARKER in data or "pruner_shapes" in data):
        return True
    try:
        plan = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and plan.get("format") == "pruner-plan/1"


def check_export_target(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Checks, before any work, that an export can be written to ``folder``; returns it
    (``~`` expanded, absolute). Refused: an empty path, the current directory or a parent of
    it, a file, an existing non-empty folder (unless ``overwrite``), an existing folder that is
    not an export of this package (even with ``overwrite``: it may hold the user's files), a
    parent folder that cannot be created or written.

    Example:
        >>> import tempfile
        >>> check_export_target(tempfile.mkdtemp()).is_dir()
        True
    """
    if not str(folder).strip():
        raise PrunerError("the export folder is an empty path: give a folder name such as outputs/pruned")
    path = Path(folder).expanduser().absolute()
    if path.is_symlink():  # a link to an export: the export is replaced where it points, the link stays
        path = path.resolve()
    cwd = Path.cwd().absolute()
    if path == cwd or path in cwd.parents:
        raise PrunerError(f"the export folder {path} is the current directory or one of its parents: exporting "
                          "there would replace it; give a new sub-folder such as outputs/pruned")
    if path.exists() and not path.is_dir():
        raise PrunerError(f"the export folder {path} is an existing file: choose a folder path (it is never "
                          "replaced, with or without overwrite)")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise PrunerError(f"{path} already exists and is not empty: choose another folder or pass "
                              "overwrite=True")
        if not is_pruner_export(path):
            raise PrunerError(f"{path} exists and is not an export written by pruner (no pruner marker in its "
                              "config.json): overwrite=True only replaces earlier exports; choose another "
                              "folder, or move its contents away yourself")
    existing = existing_ancestor(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PrunerError(f"cannot create the export folder {path}: {existing} is not a writable folder; choose a "
                          "folder you can write to")
    return path


def _apply_umask(folder: Path) -> None:
    """Gives the finished export the permissions ``save_pretrained`` of transformers would:
    folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (``mkdtemp``/``mkstemp`` create
    private 0700/0600 entries, which another account, e.g. a serving user, could not read)."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer=None, plan: Plan | None = None,
                    overwrite: bool = False, extra_files: dict[str, str] | None = None,
                    weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> Path:
    """Exports ``model`` to ``folder``: ``model.safetensors``, ``config.json`` (per-layer widths in
    ``pruner_shapes`` and an ``auto_map`` to ``modeling_pruned.py`` when layers differ; a plain
    config when they do not), tokenizer files and ``plan.json``.

    The folder appears whole or not at all: everything is written to a temporary sibling folder
    that is renamed into place. An existing non-empty folder is refused unless ``overwrite``,
    and even then only an earlier export of this package is replaced (see
    :func:`check_export_target`); of two concurrent exports to the same new folder, one wins and
    the other raises. ``extra_files``: ``{name: text}`` written into the folder too (e.g. a
    ``report.md``). ``weights``: ``(name, full tensor)`` pairs of ``model``'s state dict, written
    as they come (:func:`pruner.io.shards.write_weights`, safetensors shards of at most 2 GiB);
    ``model`` then only describes the architecture (it may be on the meta device). Returns the
    folder (``~`` expanded, absolute).
    """
    check_model(model)
    if not isinstance(folder, (str, os.PathLike)):
        raise PrunerError(f"the export folder must be a path, got {type(folder).__name__}")
    if not isinstance(overwrite, bool):
        raise PrunerError(f"overwrite={overwrite!r} must be True or False")
    folder = check_export_target(folder, overwrite)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise PrunerError(f"tokenizer must be a transformers tokenizer (with save_pretrained), got "
                          f"{type(tokenizer).__name__}: load it with pruner.data.load_tokenizer(name)")
    if plan is not None and not isinstance(plan, Plan):
        raise PrunerError(f"plan must be a pruner.Plan, got {type(plan).__name__}: pruner.Plan.load(path) reads one")
    if extra_files is not None and not isinstance(extra_files, dict):
        raise PrunerError(f"extra_files must be a dict of file name -> text, got {type(extra_files).__name__}")
    for name, text in (extra_files or {}).items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise PrunerError(f"extra file name {name!r} must be a plain file name, not a path")
        if not isinstance(text, str):
            raise PrunerError(f"extra file {name!r} must be given as text (a str), got {type(text).__name__}")
    check_merged(model, "save it")
    base = base_class(model)
    cfg = clean_config(model)
    uniform_config(model, cfg)
    spec = shape_spec(model, cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent, folder.name)  # what a killed export of this folder left
    tmp = temporary_folder(folder.parent, folder.name)
    try:
        original_config = model.config
        model.config = cfg
        try:
            if weights is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                _save_configs(model, tmp)
                write_weights(model, weights, tmp)
        finally:
            model.config = original_config
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data["architectures"] = [base.__name__]
        data[EXPORT_MARKER] = {"version": package_version(), "config": config_record(data)}
        if spec:
            source = _modeling_source(base)
            (tmp / MODELING_FILE).write_text(source)
            data["pruner_shapes"] = spec
            data["auto_map"] = {"AutoModelForCausalLM": f"modeling_pruned.Pruned{base.__name__}"}
            data["pruner_modeling_sha256"] = hashlib.sha256(source.encode()).hexdigest()
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            saved = Plan.from_dict(plan.to_dict())  # the caller's plan stays as it was
            if spec:
                saved.settings = {**saved.settings, "modeling_file_sha256": data["pruner_modeling_sha256"]}
            saved.save(tmp / "plan.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MARKER).unlink()  # the export is complete: it is no temporary folder any more
        _apply_umask(tmp)
        _put_in_place(tmp, folder, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_configs(model: nn.Module, folder: Path) -> None:
    """What ``PreTrainedModel.save_pretrained`` writes besides the weights: ``config.json`` (with
    the weights' dtype and the class as architecture) and ``generation_config.json``."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _renameat2(a: Path, b: Path, flag: int) -> int:
    """Linux ``renameat2``; returns 0, an errno, or -1 where the call does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return -1
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return 0
    err = ctypes.get_errno()
    return -1 if err in (errno.ENOSYS, errno.EINVAL) else err


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _put_in_place(tmp: Path, folder: Path, overwrite: bool) -> None:
    """Moves the finished export ``tmp`` to ``folder`` atomically, re-checking at that moment
    what is there (another writer may have finished first): a new folder appears with
    ``RENAME_NOREPLACE``; an existing one is swapped with ``RENAME_EXCHANGE``, and when what
    came out is not what may be replaced (a non-empty folder without ``overwrite``, a folder
    that is not an export), it is swapped back and the export refused."""
    if not folder.exists():
        err = _renameat2(tmp, folder, RENAME_NOREPLACE)
        if err == 0:
            return
        if err == -1:  # not Linux: rename() onto a path that appeared meanwhile fails unless it is empty
            try:
                tmp.rename(folder)
                return
            except OSError:
                pass
        if not folder.exists():
            raise PrunerError(f"could not move the export into place at {folder} ({os.strerror(err) if err > 0 else 'rename failed'})")
    err = _renameat2(tmp, folder, RENAME_EXCHANGE)
    if err == 0:
        previous = tmp  # after the exchange, the old folder sits where the new one was written
        acceptable = previous.is_dir() and (not any(previous.iterdir()) or (overwrite and is_pruner_export(previous)))
        if not acceptable:
            _renameat2(tmp, folder, RENAME_EXCHANGE)  # put it back as it was
            raise PrunerError(f"{folder} was written by someone else while this export ran: choose another folder "
                              "(or pass overwrite=True to replace an earlier export)")
        shutil.rmtree(previous, ignore_errors=True)
        return
    # elsewhere: two renames; a kill between them leaves the old folder as .<name>.old-<pid>
    if any(folder.iterdir()) and not (overwrite and is_pruner_export(folder)):
        raise PrunerError(f"{folder} was written by someone else while this export ran: choose another folder")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _check_folder(folder: Path) -> dict:
    if not folder.is_dir():
        left = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        if left:
            raise FileNotFoundError(f"model folder not found: {folder}; an interrupted export left the previous "
                                    f"version at {left[0]}: rename it back to {folder.name}")
        raise FileNotFoundError(f"model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a saved model folder")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in {folder}: the export is incomplete")
    check_shards(folder, weights)
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise PrunerError(f"{path} is not a valid safetensors file ({e}); re-export the model") from e
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PrunerError(f"{config_path} is not valid JSON ({e})") from e


def _warn_if_modeling_file_edited(folder: Path, data: dict) -> None:
    """This package never runs the folder's ``modeling_pruned.py``, but others load the folder with
    ``trust_remote_code=True``: say so when that file is not the one the export recorded."""
    recorded = data.get("pruner_modeling_sha256")
    path = folder / MODELING_FILE
    if recorded and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        warnings.warn(f"{path} differs from the file pruner wrote (its SHA-256 is not the one recorded in "
                      "config.json): it was edited. pruner.load_pretrained does not run it, but "
                      "from_pretrained(trust_remote_code=True) would: re-export the model before serving it",
                      stacklevel=3)


def load_pretrained(folder: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None,
                    allow_edited_config: bool = False):
    """Loads a folder written by :func:`save_pretrained` (or any plain HF causal LM folder).

    Never runs code from the folder: pruned widths are rebuilt by this package's own
    :mod:`pruner.structure.shapes`. Refuses weights files that miss a tensor of the model, hold
    tensors it has no place for or of another shape (transformers would initialise the missing
    ones randomly and drop the others without an error), a ``config.json`` whose computing keys
    were edited after the export (unless ``allow_edited_config``), and a ``plan.json`` that does
    not describe the weights (:mod:`pruner.io.integrity`)."""
    if dtype is not None:
        dtype = check_dtype(dtype)
    if device is not None:
        device = check_device("device", device)
    if not isinstance(folder, (str, os.PathLike)):
        raise PrunerError(f"the model folder must be a path, got {type(folder).__name__}")
    folder = Path(folder).expanduser()
    if not isinstance(allow_edited_config, bool):
        raise PrunerError(f"allow_edited_config={allow_edited_config!r} must be True or False")
    data = _check_folder(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    check_config(folder, data, allow_edited_config)
    _warn_if_modeling_file_edited(folder, data)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if "pruner_shapes" in data:
        base_name = (data.get("architectures") or [None])[0]
        base = getattr(transformers, base_name or "", None)
        if not isinstance(base, type) or not issubclass(base, transformers.PreTrainedModel):
            raise PrunerError(f"{folder}/config.json names architecture {base_name!r}, unknown to transformers "
                              f"{transformers.__version__}")
        model_class = shapes.pruned_class(base)
        check_weight_shapes(folder, list(folder.glob("*.safetensors")), meta_skeleton(lambda: model_class(config)),
                            shapes_missing=False)
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    else:
        skeleton = meta_skeleton(lambda: transformers.AutoModelForCausalLM.from_config(config))
        check_weight_shapes(folder, list(folder.glob("*.safetensors")), skeleton,
                            shapes_missing=EXPORT_MARKER in data)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                        trust_remote_code=False, **kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        listed = "; ".join(f"{k.replace('_', ' ')}: {v[:3]}{' ...' if len(v) > 3 else ''}"
                           for k, v in problems.items() if v)
        raise PrunerError(f"the weights in {folder} do not match its config.json ({listed}): the export is "
                          "incomplete or was edited; re-export the model")
    check_plan(folder, model)
    if device is not None:
        model.to(device)
    return model.eval()
