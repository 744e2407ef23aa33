"""``python -m pruner fit|validate|test --config X.yaml``: LightningCLI over ``CausalLMModule``
and ``PruneDataModule``.

Every failure ends with ONE line on stderr, ``pruner: error: ...``, and a non-zero exit status,
not a usage dump or a traceback: bad command lines and configs (a missing file, an unknown key, a
key written twice, a wrong type or value, a class path that cannot be built) with 2, before
anything runs; the package's own errors and everything else raised while the fit runs with 1; a
fit stopped by SIGTERM with 143 and by Ctrl-C with 130. ``--debug`` (or ``PRUNER_DEBUG=1``)
shows the traceback instead.

Example:
    >>> from pruner.lightning_modules.cli import run_cli  # doctest: +SKIP
    >>> run_cli(["fit", "--config", "configs/smollm2_lora.yaml", "--print_config"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = ("fit", "validate", "test")


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and every exception it was raised from, outermost first."""
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _known_options() -> dict[str, list[str]]:
    """Option names per config section, for "did you mean" suggestions."""
    import inspect

    from lightning.pytorch import Trainer

    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    names = lambda cls: [p for p in inspect.signature(cls.__init__).parameters if p != "self"]  # noqa: E731
    return {"trainer": names(Trainer), "model": names(CausalLMModule), "data": names(PruneDataModule),
            "StructuralPruneCallback": names(StructuralPruneCallback)}


def _suggest(key: str, section: str) -> str:
    import difflib

    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, _known_options().get(section, []), n=1, cutoff=0.6)
    return f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""


def explain(err: BaseException) -> str | None:
    """One line naming the key, the value and the fix for a configuration mistake (jsonargparse
    nests the real cause several exceptions deep), or for an error of this package raised
    while the classes were built; None for anything else (:func:`describe` gives its line)."""
    from pruner.errors import PrunerError

    chain = _chain(err)
    text = "\n".join(str(e) for e in chain)
    where = re.search(r'Parser key "([^"]+)"', str(chain[0]))
    cls = re.findall(r"Problem with given class_path '([^']+)'", text) or re.findall(r"class_path='([^']+)'", text)
    key = where.group(1) if where else ("trainer.callbacks" if "callbacks.callback.Callback" in text else "")
    place = key + (f"[{cls[-1].rpartition('.')[2]}]" if cls else "")
    own = next((e for e in chain if isinstance(e, (PrunerError, FileNotFoundError))), None)
    if own is not None:
        return f"{place + ': ' if place else ''}{own}"
    misconfigured = next((e for e in chain if type(e).__name__ == "MisconfigurationException"), None)
    if misconfigured is not None:  # the Trainer cannot run as configured on this machine
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        first = str(misconfigured).strip().splitlines()[0]
        return (f"{first.rstrip('.!')}: torch sees {gpus} GPU(s) here; check trainer.accelerator, devices and strategy "
                "(accelerator: auto uses what there is)")
    wrong_base = re.search(r"Import path (\S+) does not correspond to a subclass of (\w+)", text)
    if wrong_base:
        path, base = wrong_base.groups()
        return (f"{key}: class_path {path!r} is not a {base}: {key} takes {base} classes "
                "(e.g. pruner.callbacks.StructuralPruneCallback)")
    if cls:  # a class_path that cannot be built: the module, the init_args
        missing_module = next((e for e in chain if isinstance(e, ModuleNotFoundError)), None)
        if missing_module is not None:
            return (f"{key}: class_path {cls[-1]!r}: {missing_module} (no such module): fix the import path, e.g. "
                    "pruner.callbacks.StructuralPruneCallback")
        if re.search(r"'(list|str|int|float)' object has no attribute 'keys'", text):
            return (f"{key}: init_args of {cls[-1]!r} must be a mapping of argument names to values "
                    "(name: value on each line), not a list or a single value")
    choices = re.search(r'Parser key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*'
                        r'Subtypes: \[(.*?Literal\[.*?)\]\s*\n.*?Given value: ([^\n]+)', text, re.S)
    if choices:  # a value out of a fixed set: list the set
        key, subtypes, value = choices.groups()
        allowed = []
        for group in re.findall(r"Literal\[([^\]]*)\]", subtypes):
            allowed += [v.strip() for v in group.split(",") if v.strip() not in allowed]
        if "NoneType" in subtypes:
            allowed.append("null")
        return f"{key}: {value.strip()!r} is not one of {', '.join(dict.fromkeys(allowed))}: pick one of them"
    unknown = re.search(r"Option '([^']+)' is not accepted", text) or \
        re.search(r"does not accept option '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        section = cls[-1].rpartition(".")[2] if cls else key.partition(".")[0]
        return (f"{place + ': ' if place else ''}unknown option {key!r}{_suggest(key, section)}: "
                "fix its name in the config (python -m pruner fit --help lists the options)")
    missing = re.search(r"File does not exist: '([^']+)'", text)
    if missing:
        return f"config file not found: {missing.group(1)}: pass --config with an existing YAML file"
    union = list(re.finditer(r'Parser key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*'
                             r'Subtypes: \[([^\]]*)\].*?Given value: ([^\n]+)', text, re.S))
    if union:  # an Optional[int] and the like: name the key and every type it takes
        key, subtypes, value = union[-1].groups()
        kinds = [("null" if k == "NoneType" else k) for k in re.findall(r"<class '(\w+)'>", subtypes)]
        key = key if not place or key == place.split("[")[0] else f"{place}.{key}"
        first = kinds[0] if kinds else "value"
        return (f"{key}: expected {'an' if first[0] in 'aeiou' else 'a'} {' or '.join(kinds) or 'valid value'}, "
                f"got {value.strip()!r}: give a value of that type")
    typed = list(re.finditer(r'Parser key "([^"]+)":\s*Expected a <class \'(\w+)\'>\. Got value: (.+)', text))
    if typed:
        key, kind, value = typed[-1].groups()
        key = key if not place or key == place.split("[")[0] else f"{place}.{key}"
        return f"{key}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value.strip()!r}: give a value of that type"
    from jsonargparse import ArgumentError

    if isinstance(chain[0], (ValueError, ArgumentError)) or "jsonargparse" in type(chain[0]).__module__ or where:
        lines = [ln.strip() for e in chain[-1:] for ln in str(e).strip().splitlines() if ln.strip()]
        return f"{place + ': ' if place else ''}{' '.join(lines[:3])[:300]}"
    return None


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"pruner: error: {' '.join(message.split())}\n")
    return status


class _DuplicateKeyLoader:
    """A YAML loader that refuses a key written twice in one mapping (PyYAML keeps the last
    silently), naming the file, the line and the key."""

    @staticmethod
    def check(path: Path, seen: set[Path] | None = None) -> None:
        import yaml

        from pruner.errors import PrunerError

        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node, deep=False):
            keys = {}
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                if key in keys:
                    raise PrunerError(f"{path}:{key_node.start_mark.line + 1}: key {key!r} is written twice in one "
                                      f"section (first on line {keys[key]}; YAML would silently keep the second): "
                                      "keep one")
                keys[key] = key_node.start_mark.line + 1
            return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        seen = seen if seen is not None else set()
        if path in seen or not path.is_file():
            return  # a missing file is reported by the parser, with its own message
        seen.add(path)
        try:
            data = yaml.load(path.read_text(), Loader=Loader)
        except yaml.YAMLError:
            return  # a syntax error is reported by the parser
        if isinstance(data, dict) and isinstance(data.get("config"), str):  # a nested config: relative to this file
            _DuplicateKeyLoader.check(path.parent / data["config"], seen)


def _option(argv: Sequence[str], name: str) -> list[str]:
    """The values of ``--name VALUE`` / ``--name=VALUE`` on a command line."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]
    return values + [arg.split("=", 1)[1] for arg in argv if arg.startswith(name + "=")]


def check_command_line(argv: Sequence[str]) -> None:
    """Before LightningCLI parses (it reads a checkpoint's hyper-parameters while it builds): no
    ``--config`` file writes a key twice, and ``--ckpt_path`` names a checkpoint."""
    for config in _option(argv, "--config"):
        _DuplicateKeyLoader.check(Path(config))
    for path in _option(argv, "--ckpt_path"):
        check_checkpoint_path(path)


def check_checkpoint_path(path) -> None:
    """``--ckpt_path`` names a checkpoint file (Lightning's ``last``/``best``/``hpc``/``registry`` aside):
    refused before the fit starts, not after the model loads."""
    import zipfile

    from pruner.errors import PrunerError

    if path is None or str(path) in ("last", "best", "hpc", "registry") or str(path).startswith("registry:"):
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file; pass a .ckpt written by a fit "
                                "(ModelCheckpoint or trainer.save_checkpoint), or leave it out to start afresh")
    if not zipfile.is_zipfile(file):
        raise PrunerError(f"--ckpt_path {path} is not a checkpoint (a .ckpt is a torch.save archive): pass the .ckpt "
                          "file a fit wrote, not a config or another file")


def check_output_folders(trainer) -> None:
    """The folders the fit writes into (``default_root_dir``, the logger's) can be written: refused
    before any work rather than after it."""
    from pruner.checks import check_writable_folder

    folders = {"trainer.default_root_dir": trainer.default_root_dir}
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            folders[f"the logger's save_dir ({type(logger).__name__})"] = logger.save_dir
    for name, folder in folders.items():
        check_writable_folder(name, folder, fix="choose a folder you can write to")


class _Running:
    """The trainer of the fit this process runs (to tell how a SystemExit came about)."""

    trainer = None


def build_cli(argv: Sequence[str] | None, run: bool = True):
    """Builds (and with ``run=True`` runs) the LightningCLI; parsing errors raise
    ``jsonargparse.ArgumentError`` instead of exiting."""
    from lightning.pytorch.cli import LightningCLI

    from pruner.errors import PrunerError
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    no_exit = {"exit_on_error": False}
    # main(argv) from Python (tests, scripts) passes args while sys.argv holds the caller's.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    class PrunerCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            _Running.trainer = self.trainer
            check_output_folders(self.trainer)

        def instantiate_trainer(self, **kwargs):
            mine = [c for c in kwargs.get("callbacks") or [] if type(c).__name__ == "StructuralPruneCallback"]
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            mine += [c for c in config["trainer"].get("callbacks") or []
                     if type(c).__name__ == "StructuralPruneCallback" and c not in mine]
            if len(mine) > 1:
                raise PrunerError(f"trainer.callbacks lists StructuralPruneCallback {len(mine)} times: one fit prunes "
                                  "once; keep one (prune again in a second fit on the exported model)")
            return super().instantiate_trainer(**kwargs)

    return PrunerCLI(
        CausalLMModule,
        PruneDataModule,
        args=None if argv is None else list(argv),  # None: sys.argv
        run=run,
        # The main parser and each subcommand parser are separate: all must raise, not exit.
        parser_kwargs={"prog": "pruner", **no_exit, **{cmd: dict(no_exit) for cmd in SUBCOMMANDS}},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Runs one Lightning subcommand and returns the exit status.

    Example:
        >>> run_cli(["fit", "--config", "missing.yaml"])  # doctest: +SKIP
        2
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from pruner.errors import PrunerError, describe

    debug = os.environ.get("PRUNER_DEBUG", "") not in ("", "0")
    _Running.trainer = None
    try:
        check_command_line(sys.argv[1:] if argv is None else list(argv))
    except (PrunerError, FileNotFoundError) as err:
        if debug:
            raise
        return _fail(str(err), 2)
    try:
        build_cli(None if argv is None else list(argv))
    except SIGTERMException:  # a SystemExit with no code: it would exit 0
        return _fail(f"stopped by SIGTERM at step {_step()}: nothing was exported; resume with --ckpt_path from the "
                     "last checkpoint, if the fit wrote any", 143)
    except SystemExit as done:  # --help / --print_config exit 0 from inside the parser
        if _Running.trainer is not None and _Running.trainer.interrupted:  # Lightning turns Ctrl-C into exit(1)
            return _fail(f"interrupted (Ctrl-C) at step {_step()}: nothing was exported; resume with --ckpt_path from "
                         "the last checkpoint, if the fit wrote any", 130)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else _fail(str(done.code), 2))
    except Exception as err:  # noqa: BLE001 - every failure: one line (the traceback with --debug)
        if debug:
            raise
        message = explain(err)
        if message is None:
            return _fail(describe(err), 1)
        own = any(isinstance(e, (PrunerError, FileNotFoundError)) for e in _chain(err))
        return _fail(message, 1 if own and not isinstance(err, ArgumentError) else 2)
    return 0


def _step() -> int | str:
    return _Running.trainer.global_step if _Running.trainer is not None else "?"
