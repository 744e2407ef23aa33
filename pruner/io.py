"""Saving and loading pruned models: safetensors + config + plan, atomically, without pickle.

Example:
    >>> save_pretrained(model, "out/smollm2-pruned", tokenizer=tokenizer, plan=plan)  # doctest: +SKIP
    >>> model = load_pretrained("out/smollm2-pruned")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn

from . import export_shapes
from .errors import PrunerError
from .plan import Plan

MODELING_FILE = "modeling_pruned.py"


def _base_class(model: nn.Module) -> type:
    for cls in type(model).__mro__:
        if getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise PrunerError(f"{type(model).__name__} is not a transformers model class: cannot export it")


def _clean_config(model: nn.Module):
    cfg = copy.deepcopy(model.config)
    for key in ("pruner_shapes", "auto_map", "pruner_base_class", "_pruner_private"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    return cfg


def _uniform_config(model: nn.Module, cfg) -> None:
    """Moves per-layer sizes into the global config where every layer agrees."""
    private = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_pruner_private", False)]
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        owners = [c for c in private if key in getattr(c, "_pruner_keys", ())]
        values = {getattr(c, key) for c in owners}
        if len(owners) == cfg.num_hidden_layers and len(values) == 1:  # every layer agrees
            setattr(cfg, key, values.pop())
    if private and getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = private[0].head_dim


def shape_spec(model: nn.Module, cfg) -> dict:
    """What differs between ``model`` and a dense model built from ``cfg`` (on the meta device)."""
    base = _base_class(model)
    with torch.device("meta"):
        dense = base(copy.deepcopy(cfg))
    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    spec: dict = {"params": {}, "attrs": {}, "configs": {}}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in dense_params:
            raise PrunerError(f"parameter {name} has no counterpart in a {base.__name__} built from the config")
        if tuple(dense_params[name].shape) != tuple(p.shape):
            spec["params"][name] = list(p.shape)
    dense_modules = dict(dense.named_modules())
    for name, mod in model.named_modules():
        ref = dense_modules.get(name)
        if ref is None:
            continue
        for key, value in vars(mod).items():
            if key.startswith("_") or key == "training" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and getattr(ref, key, None) != value:
                spec["attrs"].setdefault(name, {})[key] = value
        sub = getattr(mod, "config", None)
        if getattr(sub, "_pruner_private", False):
            diff = {k: getattr(sub, k) for k in getattr(sub, "_pruner_keys", ())
                    if getattr(sub, k) != getattr(cfg, k, None)}
            if diff:
                spec["configs"][name] = diff
    return {k: v for k, v in spec.items() if v}


def _modeling_source(base: type) -> str:
    source = Path(export_shapes.__file__).read_text()
    return (source + f"\n\nfrom transformers import {base.__name__}\n\n\n"
            f"class Pruned{base.__name__}(pruned_class({base.__name__})):\n"
            f'    """{base.__name__} with per-layer widths from ``config.pruner_shapes`` (written by pruner)."""\n')


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer=None, plan: Plan | None = None,
                    overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Exports ``model`` to ``folder``: ``model.safetensors``, ``config.json`` (per-layer widths in
    ``pruner_shapes`` and an ``auto_map`` to ``modeling_pruned.py`` when layers differ; a plain
    config when they do not), tokenizer files and ``plan.json``.

    The folder appears whole or not at all: everything is written to a temporary sibling folder
    that is renamed into place. An existing non-empty folder is refused unless ``overwrite``.
    ``extra_files``: ``{name: text}`` written into the folder too (e.g. a ``report.md``).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise PrunerError(f"{folder} already exists and is not empty: choose another folder or pass overwrite=True")
    base = _base_class(model)
    cfg = _clean_config(model)
    _uniform_config(model, cfg)
    spec = shape_spec(model, cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-{os.getpid()}-"))
    try:
        original_config = model.config
        model.config = cfg
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config = original_config
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data["architectures"] = [base.__name__]
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
            if Path(name).name != name:
                raise PrunerError(f"extra file name {name!r} must be a plain file name, not a path")
            (tmp / name).write_text(text)
        if folder.exists():
            _replace_folder(tmp, folder)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_folder(new: Path, folder: Path) -> None:
    """Puts ``new`` in place of the existing ``folder``. On Linux one atomic exchange: a kill at
    any moment leaves the old or the new folder at ``folder``. Elsewhere two renames; a kill
    between them leaves the old folder as ``.<name>.old-<pid>``, which loading points to."""
    if _exchange(new, folder):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_siblings(folder: Path) -> None:
    """Deletes temporary folders that a killed export of ``folder`` left behind (their writer's
    process is gone); a live concurrent export's folder is left alone."""
    for path in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = path.name[len(f".{folder.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, owned by someone else
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


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


def load_pretrained(folder: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Loads a folder written by :func:`save_pretrained` (or any plain HF causal LM folder).

    Never runs code from the folder: pruned widths are rebuilt by this package's own
    :mod:`pruner.export_shapes`."""
    folder = Path(folder)
    data = _check_folder(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if "pruner_shapes" in data:
        base_name = (data.get("architectures") or [None])[0]
        base = getattr(transformers, base_name or "", None)
        if base is None:
            raise PrunerError(f"{folder}/config.json names architecture {base_name!r}, unknown to transformers "
                              f"{transformers.__version__}")
        model = export_shapes.pruned_class(base).from_pretrained(folder, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()
