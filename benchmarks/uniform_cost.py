"""What uniform widths and aligned widths cost in quality on SmolLM2-135M at -20 % of all
parameters: WikiText-2 perplexity (paper protocol) over several calibration seeds.

    python benchmarks/uniform_cost.py --seeds 0,1,2 --output uniform.json

Rows (element1, 10 x 64 calibration tokens per seed from ``../shared/data/gutenberg``, builtin
text without it; KV groups + MLP channels; no recovery):
* ``local 4-27``: the paper's allocation, the same fraction in each of layers 4-27 (per-layer
  widths: layers 0-3 and 28-29 stay dense, so the export needs per-layer shapes);
* ``uniform``: ``uniform=True``, every layer alike (a plain config: vLLM / TGI / TensorRT-LLM,
  llama.cpp's ``llama`` architecture);
* ``global``: global ranking over layers 4-27 (uneven widths);
each with ``round_to`` 1 and 32 (whole quantization blocks / SIMD-friendly widths).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from _sources import calibration_source, wikitext2_rows  # benchmarks/ is on sys.path when a script here runs

ROWS = {
    "local 4-27": dict(attention_layers=(4, 28), mlp_layers=(4, 28), global_ranking=False),
    "uniform": dict(uniform=True),
    "global 4-27": dict(attention_layers=(4, 28), mlp_layers=(4, 28), global_ranking=True),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--round-to", default="1,32")
    p.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 tokens evaluated (paper: 32,768)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    import pruner
    from pruner.data import calibration_samples
    from pruner.eval.perplexity import perplexity

    dense, tok = pruner.load_model("smollm2")
    rows = wikitext2_rows()
    source = calibration_source()
    base = perplexity(dense, tok, rows, max_tokens=args.max_tokens)
    print(f"dense {base:.2f}", flush=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        cal = calibration_samples(source, tok, 10, 64, seed=seed)
        for name, kwargs in ROWS.items():
            for round_to in (int(r) for r in args.round_to.split(",")):
                model = copy.deepcopy(dense)
                plan = pruner.prune(model, [cal[i: i + 1] for i in range(10)], target_sparsity=0.2,
                                    head_granularity="kv", round_to=round_to, **kwargs)
                ppl = perplexity(model, tok, rows, max_tokens=args.max_tokens)
                row = {"allocation": name, "round_to": round_to, "seed": seed, "ppl": ppl, "x_dense": ppl / base,
                       "removed": plan.params["removed_fraction"]}
                results.append(row)
                print(row, flush=True)
                del model
    print(f"\nSmolLM2-135M, -20 %, element1, WikiText-2 ({args.max_tokens} tokens, dense {base:.2f}), seeds "
          f"{args.seeds}, {time.strftime('%Y-%m-%d')}")
    print("| allocation | round_to | ppl / dense: mean (min-max) | removed |")
    print("|---|---|---|---|")
    for name in ROWS:
        for round_to in (int(r) for r in args.round_to.split(",")):
            xs = [r["x_dense"] for r in results if r["allocation"] == name and r["round_to"] == round_to]
            removed = [r["removed"] for r in results if r["allocation"] == name and r["round_to"] == round_to]
            print(f"| {name} | {round_to} | {statistics.mean(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f}) | "
                  f"{statistics.mean(removed):.2%} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"dense": base, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
