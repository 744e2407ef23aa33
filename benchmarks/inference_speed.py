"""Inference speed of pruned SmolLM2-135M: dense vs -20% / -50% of parameters, with kept widths
rounded to multiples of 1, 8 or 64.

    python benchmarks/inference_speed.py --output speed.json

For each model: prefill tokens/s (batch 1 and 8, 128-token prompts, one forward pass) and
greedy generation tokens/s (batch 1, 64 new tokens after a 128-token prompt), median of
``--repeats`` runs after a warm-up, fp32, all torch threads. The ideal speed-up is the
parameter ratio (dense params / pruned params) for the linear layers; attention over the
sequence and the (unpruned) embedding/head cost shrink less. Pruning: element1 importance,
10 x 64 Gutenberg windows (or builtin text without ../shared), global ranking over whole KV
groups and MLP channels in layers 4-27 for -20% and 1-28 (at most 90% of a layer) for -50%;
``--allocation local-mlp`` gives the default recipe's shapes instead (MLP channels only, the same
count in every layer, attention untouched: which channels go does not change the speed).

    python benchmarks/inference_speed.py --targets 0.2 --round-to 32 --allocation local-mlp
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.2,0.5", help="fractions of all parameters to remove")
    p.add_argument("--round-to", default="1,8,64", help="multiples the kept widths are rounded to")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--allocation", choices=["global-kv", "local-mlp"], default="global-kv",
                   help="global-kv: whole KV groups and MLP channels ranked globally; local-mlp: MLP channels only, "
                        "the same count per layer (the default recipe)")
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    import pruner
    from pruner.loop import estimate_importance, make_plan
    from pruner.config import PruneConfig
    from pruner.data import calibration_samples
    from pruner.eval.efficiency import measure_latency

    torch.manual_seed(0)
    dense, tok = pruner.load_model("smollm2")
    source = str(DATA / "gutenberg") if (DATA / "gutenberg").is_dir() else "builtin"
    cal = calibration_samples(source, tok, 10, 64, seed=0)
    structure = pruner.discover(dense)
    total = pruner.count_parameters(dense)
    base = PruneConfig(criterion="element1", target_sparsity=0.2, attention_layers=(1, 29), mlp_layers=(1, 29),
                       global_ranking=True, head_granularity="kv")
    vectors = estimate_importance(dense, [cal[i : i + 1] for i in range(len(cal))], structure, base)

    def speed(model) -> dict:
        b1 = measure_latency(model, tok, batch_size=1, seq_len=128, new_tokens=64, repeats=args.repeats)
        b8 = measure_latency(model, tok, batch_size=8, seq_len=128, new_tokens=1, repeats=args.repeats)
        return {"params": pruner.count_parameters(model), "prefill_b1": b1["prefill_tokens_per_s"],
                "prefill_b8": b8["prefill_tokens_per_s"], "generate_b1": b1["generate_tokens_per_s"],
                "decode_b1": b1["decode_tokens_per_s"]}

    rows = {"dense": speed(dense)}
    print(f"dense: {rows['dense']}", flush=True)
    for target in (float(t) for t in args.targets.split(",")):
        for r in (int(x) for x in args.round_to.split(",")):
            # -50% does not fit in layers 4-27 with widths rounded to 64: widen to 1-28 there
            span = (4, 28) if target <= 0.3 else (1, 29)
            shape = {"prune_attention": False, "global_ranking": False} if args.allocation == "local-mlp" else {}
            cfg = PruneConfig(**{**base.to_dict(), "target_sparsity": target, "round_to": r,
                                 "attention_layers": span, "mlp_layers": span,
                                 "max_layer_ratio": 0.9 if target > 0.3 else 1.0, **shape})
            model = copy.deepcopy(dense)
            pruner.apply_plan(make_plan(structure, vectors, cfg, total), model, structure)
            name = f"-{target:.0%} round {r}" + (" MLP only" if args.allocation == "local-mlp" else "")
            rows[name] = speed(model)
            print(f"{name}: {rows[name]}", flush=True)
            del model

    d = rows["dense"]
    print(f"\nSmolLM2-135M, fp32, {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| model | params | ideal x | prefill b1 tok/s (x) | prefill b8 tok/s (x) | generate b1 tok/s (x) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = " | ".join(f"{r[k]:,.0f} ({r[k] / d[k]:.2f}x)" for k in ("prefill_b1", "prefill_b8", "generate_b1"))
        print(f"| {name} | {r['params']:,} | {d['params'] / r['params']:.2f} | {cells} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": platform.machine(), "threads": torch.get_num_threads(),
                                                 "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
