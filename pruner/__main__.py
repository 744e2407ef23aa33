"""Entry point of ``python -m pruner`` and of the ``pruner`` console script.

    pruner fit|validate|test --config configs/X.yaml [--print_config] [--key value ...]
    pruner evaluate ...        (zero-shot / perplexity evaluation: ``pruner.eval.cli``)
    pruner export-gguf FOLDER OUT.gguf [--dtype f16|q8_0|...]   (``pruner.gguf_export``)

Example:
    >>> from pruner.__main__ import main  # doctest: +SKIP
    >>> main(["fit", "--config", "configs/tiny_test.yaml", "--print_config"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = (
    "usage: pruner {fit,validate,test} --config CONFIG.yaml [--print_config] [--key value ...]\n"
    "       pruner evaluate [options]   (see `pruner evaluate --help`)\n"
    "       pruner export-gguf FOLDER OUT.gguf [--dtype f16|q8_0|...]   (see `pruner export-gguf --help`)\n"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the Lightning CLI or to the evaluation CLI; returns the exit status
    (``sys.exit(main())`` when run as a program)."""
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        try:  # imported lazily: evaluation needs none of Lightning's start-up cost
            from pruner.eval.cli import main as evaluate_main
        except ImportError as err:
            sys.stderr.write(f"pruner: error: `pruner evaluate` is unavailable ({err})\n")
            return 1
        status = evaluate_main(argv[1:])
        return status if isinstance(status, int) else 0
    if argv and argv[0] == "export-gguf":
        from pruner.gguf_export import main as export_main

        return export_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    from pruner.lightning_modules.cli import run_cli

    # None lets LightningCLI read sys.argv itself (it warns when given both).
    return run_cli(None if given is None else argv)


if __name__ == "__main__":
    sys.exit(main())
