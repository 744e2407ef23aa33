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
import sys
import warnings
from collections.abc import Sequence

SUBCOMMANDS = ("fit", "validate", "test")


def _one_line(message: str) -> str:
    """jsonargparse nests causes over many lines; the first lines say what and where."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:3]) if lines else "invalid arguments"
    return text if len(text) <= 400 else text[:397] + "..."


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"pruner: error: {_one_line(message)}\n")
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
    except ArgumentError as err:
        if debug:
            raise
        return _fail(str(err), 2)
    except (PrunerError, FileNotFoundError) as err:
        if debug:
            raise
        return _fail(f"{type(err).__name__}: {err}", 1)
    except SystemExit as done:  # --help / --print_config exit 0 from inside the parser
        return done.code if isinstance(done.code, int) else (0 if done.code is None else _fail(str(done.code), 2))
    return 0
