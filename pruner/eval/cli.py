"""``python -m pruner evaluate``: evaluate a dense model, optionally beside pruned ones, and write
a report (``results.json``, ``report.md``, plan plots).

Example:
    python -m pruner evaluate --model smollm2 --compare runs/pruned \\
        --wikitext ../shared/data/wikitext2_raw/wiki.test.raw \\
        --zeroshot-dir ../shared/data/zeroshot --limit 200 --output report/

``--wikitext hub`` / ``--zeroshot-dir hub`` use the Hugging Face datasets / lm-eval's hub tasks
instead of local files (internet needed). Without ``--wikitext`` or ``--zeroshot-dir`` that part
is skipped. Bad paths end with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pruner.checks import check_device, check_writable_folder
from pruner.eval.zeroshot import HUB_TASKS, LOCAL_TASKS
from pruner.precision import warn_if_bf16_is_emulated

if TYPE_CHECKING:
    import torch

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pruner evaluate",
        description="Perplexity, zero-shot accuracy, efficiency and generations of dense and pruned models.",
    )
    p.add_argument("--model", required=True, help="dense model: 'smollm2', a folder, a .gguf file or a hub name")
    p.add_argument("--compare", action="append", default=[], metavar="MODEL",
                   help="a pruned model to compare (repeatable)")
    p.add_argument("--plan", help="pruning plan JSON for the plots (default: plan.json in the --compare folder)")
    p.add_argument("--wikitext", help="wiki.test.raw path, or 'hub' (default: skip perplexity)")
    p.add_argument("--zeroshot-dir", help="folder of <task>.jsonl files, or 'hub' (default: skip zero-shot)")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS), help="comma-separated task names (default: %(default)s)")
    p.add_argument("--limit", type=int, help="first N items of each zero-shot task")
    p.add_argument("--max-tokens", type=int, default=32768, help="perplexity on the first N tokens (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window (default: %(default)s)")
    p.add_argument("--protocol", choices=["auto", "paper", "bos"], default="auto",
                   help="perplexity windows: auto (after the tokenizer's BOS when it adds one), paper (never a BOS: "
                        "LLM-Pruner's tables) or bos (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=["auto", "lm-eval", "builtin"], default="auto",
                   help="zero-shot scorer (default: lm-eval when installed)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency / memory measurement")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (0: no generations)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto",
                   help="where the models run: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--output", default="eval_report", help="report folder (default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def _check_inputs(args: argparse.Namespace, tasks: list[str]) -> tuple[dict | None, torch.device]:
    """Fails fast, before any model is loaded: numbers out of range, a device torch cannot use,
    paths that do not exist, zero-shot files that do not parse, a report folder that cannot be
    written, a plan that does not parse. Returns the plan for the plots (``--plan``, or plan.json
    of a ``--compare``) and the device the models will run on."""
    from pruner.eval.zeroshot import load_items
    from pruner.io import resolve_model_source

    for flag, value, minimum in (("--limit", args.limit, 1), ("--max-tokens", args.max_tokens, 2),
                                 ("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                                 ("--new-tokens", args.new_tokens, 0)):
        if value is not None and value < minimum:
            raise ValueError(f"{flag} {value} must be at least {minimum}" + (" (or leave it out for all items)"
                                                                              if flag == "--limit" else ""))
    if args.max_tokens < args.seq_len:
        raise ValueError(f"--max-tokens {args.max_tokens} is shorter than one --seq-len {args.seq_len} window: "
                         "raise --max-tokens or lower --seq-len")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {args.dtype!r} is not supported: use float32, bfloat16 or float16")
    device = check_device("--device", args.device, allow_auto=True)
    if args.dtype == "bfloat16":
        warn_if_bf16_is_emulated(device, "--dtype bfloat16", "evaluate with --dtype float32")
    if not tasks:
        raise ValueError("--tasks is empty: name at least one task, e.g. --tasks piqa,arc_easy")
    for name in [args.model, *args.compare]:
        resolve_model_source(name)  # FileNotFoundError for a missing folder / GGUF file
    if args.wikitext and args.wikitext != "hub" and not Path(args.wikitext).expanduser().is_file():
        raise FileNotFoundError(f"WikiText-2 file not found: {args.wikitext}")
    if args.zeroshot_dir == "hub":
        unknown = [t for t in tasks if t not in HUB_TASKS]
        if unknown:
            raise ValueError(f"unknown hub task(s) {unknown}; known: {', '.join(HUB_TASKS)}")
    elif args.zeroshot_dir:
        for t in tasks:
            path = Path(args.zeroshot_dir).expanduser() / f"{t}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"zero-shot task file not found: {path}")
            load_items(path, args.limit)  # parses and checks the items the run will score
    check_writable_folder("--output", args.output, "give a folder for the report that you can write to")
    from pruner.structure import Plan

    if args.plan:
        return Plan.load(args.plan).to_dict(), device  # FileNotFoundError / PrunerError naming the file
    for folder in args.compare:
        if (Path(folder).expanduser() / "plan.json").is_file():
            return Plan.load(Path(folder).expanduser() / "plan.json").to_dict(), device
    return None, device


def _label(name: str, taken: set[str]) -> str:
    label = Path(name).name or name
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def run(args: argparse.Namespace) -> int:
    from pruner.data import load_wikitext2_rows
    from pruner.eval.report import compare, format_generations, format_tables, write_report
    from pruner.io import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    plan, device = _check_inputs(args, tasks)
    rows = None
    if args.wikitext:
        rows = load_wikitext2_rows(None if args.wikitext == "hub" else args.wikitext)
    taken: set[str] = set()
    models = {}
    for name in [args.model, *args.compare]:
        model, tokenizer = load_model(name, dtype=args.dtype)
        models[_label(name, taken)] = (model.to(device), tokenizer)  # every model stays there: they are compared
    results = compare(
        models,
        wikitext=rows,
        zeroshot_dir=args.zeroshot_dir,
        tasks=tasks,
        limit=args.limit,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        prompts=None if args.new_tokens > 0 else [],
        new_tokens=args.new_tokens,
        latency={"skip": True} if args.no_latency else None,
        backend=args.backend,
        protocol=args.protocol,
        progress=args.progress,
    )
    results["meta"]["device"] = str(device)
    written = write_report(results, args.output, plan=plan)
    print(format_tables(results))
    gens = format_generations(results)
    if gens:
        print("\n" + gens)
    print(f"\nreport: {written['report.md']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pruner evaluate``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and bad usage (2): return instead
        return int(exc.code or 0)
    try:
        return run(args)
    except (OSError, ValueError, ImportError) as exc:  # JSONDecodeError is a ValueError
        # User errors (bad path, bad task name, missing optional package): one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
