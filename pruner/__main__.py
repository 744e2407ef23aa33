"""Entry point of ``python -m pruner`` and of the ``pruner`` console script.

    pruner fit|validate|test --config configs/X.yaml [--print_config] [--key value ...]
    pruner evaluate ...        (zero-shot / perplexity evaluation: ``pruner.eval.cli``)
    pruner export-gguf FOLDER OUT.gguf [--dtype f16|q8_0|...]   (``pruner.io.gguf``)

Any failure prints one line, ``pruner: error: ...``, and exits non-zero; ``--debug`` anywhere on
the command line (or ``PRUNER_DEBUG=1``) shows the traceback instead.

Run as a program on a machine without a GPU, ``fit``, ``validate``, ``test`` and ``evaluate``
first make glibc keep freed memory for reuse (``pruner.memory.keep_freed_memory``: the same
model, faster steps; ``PRUNER_KEEP_FREED_MEMORY=0`` turns it off).

Example:
    >>> from pruner.__main__ import main  # doctest: +SKIP
    >>> main(["fit", "--config", "configs/tiny_test.yaml", "--print_config"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pruner.lightning_modules.cli import SUBCOMMANDS  # the Lightning ones; the module imports no Lightning at load

USAGE = (
    "usage: pruner {fit,validate,test} --config CONFIG.yaml [--print_config] [--key value ...]\n"
    "       pruner evaluate [options]   (see `pruner evaluate --help`)\n"
    "       pruner export-gguf FOLDER OUT.gguf [--dtype f16|q8_0|...]   (see `pruner export-gguf --help`)\n"
)


def tune_allocator_for_cpu_steps() -> bool:
    """``pruner.memory.keep_freed_memory`` on a machine without a GPU, where the training and
    evaluation steps run on the CPU and glibc would page in their large tensors afresh at every
    step (slower steps, docs/results.md); True when it was applied. Left alone with a
    GPU (the host would keep what model loading frees) and when ``PRUNER_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("PRUNER_KEEP_FREED_MEMORY", "") == "0":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    from pruner.memory import keep_freed_memory

    return keep_freed_memory()


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the Lightning CLI or to the evaluation CLI; returns the exit status
    (``sys.exit(main())`` when run as a program)."""
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # the traceback instead of one line, for every subcommand
        argv = [a for a in argv if a != "--debug"]
        os.environ["PRUNER_DEBUG"] = "1"
        given = argv if given is not None else None
        if given is None:
            sys.argv = [sys.argv[0], *argv]
    try:
        return _dispatch(argv, given)
    except Exception as err:  # noqa: BLE001 - the one error path: one line unless debugging
        if os.environ.get("PRUNER_DEBUG", "") not in ("", "0"):
            raise
        from pruner.errors import describe

        sys.stderr.write(f"pruner: error: {' '.join(describe(err).split())}\n")
        return 1


def _dispatch(argv: list[str], given: Sequence[str] | None) -> int:
    run_as_program = given is None  # not main([...]) from Python: the allocator is the whole process's
    if run_as_program and argv and argv[0] in ("evaluate", *SUBCOMMANDS) and "--help" not in argv:
        tune_allocator_for_cpu_steps()
    if argv and argv[0] == "evaluate":
        try:  # imported lazily: evaluation needs none of Lightning's start-up cost
            from pruner.eval.cli import main as evaluate_main
        except ImportError as err:
            sys.stderr.write(f"pruner: error: `pruner evaluate` is unavailable ({err})\n")
            return 1
        status = evaluate_main(argv[1:])
        return status if isinstance(status, int) else 0
    if argv and argv[0] == "export-gguf":
        from pruner.io.gguf import main as export_main

        return export_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    from pruner.lightning_modules.cli import run_cli

    # None lets LightningCLI read sys.argv itself (it warns when given both).
    return run_cli(None if given is None else argv)


if __name__ == "__main__":
    sys.exit(main())
