"""``python -m pruner fit|validate|test --config X.yaml``: LightningCLI over ``CausalLMModule``
and ``PruneDataModule``.

Bad command lines (missing config file, unknown key, wrong type) end with ONE line on stderr,
``pruner: error: ...``, and exit status 2, not a usage dump or a traceback; so do the
package's own input errors (``PrunerError``, ``FileNotFoundError``) raised while the classes
are built or run, with exit status 1. Set ``PRUNER_DEBUG=1`` to get the traceback instead.

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
    while the classes were built; None for anything else (a bug: the traceback is kept)."""
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


def build_cli(argv: Sequence[str] | None, run: bool = True):
    """Builds (and with ``run=True`` runs) the LightningCLI; parsing errors raise
    ``jsonargparse.ArgumentError`` instead of exiting."""
    from lightning.pytorch.cli import LightningCLI

    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    no_exit = {"exit_on_error": False}
    # main(argv) from Python (tests, scripts) passes args while sys.argv holds the caller's.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return LightningCLI(
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

    from pruner.errors import PrunerError

    debug = os.environ.get("PRUNER_DEBUG", "") not in ("", "0")
    try:
        build_cli(None if argv is None else list(argv))
    except SystemExit as done:  # --help / --print_config exit 0 from inside the parser
        return done.code if isinstance(done.code, int) else (0 if done.code is None else _fail(str(done.code), 2))
    except Exception as err:  # noqa: BLE001 - sorted below: configuration mistakes vs bugs
        message = None if debug else explain(err)
        if message is None:
            raise
        own = any(isinstance(e, (PrunerError, FileNotFoundError)) for e in _chain(err))
        return _fail(message, 1 if own and not isinstance(err, ArgumentError) else 2)
    return 0
