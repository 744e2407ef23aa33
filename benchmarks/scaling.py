"""How the cost of pruning grows with model size: random LLaMA configs of growing width and
depth, each measured in a fresh process.

    python benchmarks/scaling.py --output scaling.json

Per config: parameters, weight bytes, group discovery time, importance estimation time
(element1, 10 samples x 64 tokens, one backward per sample) and the peak resident memory
above the loaded model during estimation, as a multiple of the weight bytes, under glibc's
default allocator settings and with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed temporaries go back
to the system at once: close to what the tensors need; see ``prune_cost.py``), next to the
memory model's prediction (fp32 running gradient sums of the scored tensors). These are the
inputs of the memory and time model in ``docs/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _child import FIXED_MMAP, run_child  # benchmarks/ is on sys.path when a script here runs

WIDTHS = (256, 512, 768, 1024)  # at 8 layers
DEPTHS = (4, 8, 16, 32)  # at width 512
VOCAB = 8192


def config(hidden: int, layers: int) -> dict:
    heads = hidden // 64
    return dict(hidden_size=hidden, intermediate_size=(8 * hidden // 3) // 64 * 64, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64, vocab_size=VOCAB,
                max_position_embeddings=256, tie_word_embeddings=False)


def one(hidden: int, layers: int) -> dict:
    import torch
    import transformers as tf

    import pruner
    from pruner.loop import estimate_importance, families_for
    from pruner.config import PruneConfig
    from pruner.eval.efficiency import peak_memory, weights_bytes

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**config(hidden, layers))).eval()
    batches = [torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(10)]
    start = time.perf_counter()
    structure = pruner.discover(model)
    discover_s = time.perf_counter() - start
    cfg = PruneConfig(criterion="element1", target_sparsity=0.2, global_ranking=True)
    params = dict(model.named_parameters())
    scored = {id(params[m.param]): params[m.param].numel() for f in families_for(structure, cfg) for m in f.members}
    start = time.perf_counter()
    _, peak = peak_memory(lambda: estimate_importance(model, batches, structure, cfg))
    return {"hidden": hidden, "layers": layers, "params": pruner.count_parameters(model),
            "weights_bytes": weights_bytes(model), "discover_s": discover_s,
            "importance_s": time.perf_counter() - start, "peak_extra_bytes": peak,
            "predicted_bytes": 4 * sum(scored.values()), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        hidden, layers = (int(x) for x in args.child.split(","))
        print(json.dumps(one(hidden, layers)), flush=True)
        return 0
    rows = []
    for hidden, layers in [(w, 8) for w in WIDTHS] + [(512, d) for d in DEPTHS if d != 8]:
        row = run_child(__file__, ["--child", f"{hidden},{layers}"], timeout=1800)
        fixed = run_child(__file__, ["--child", f"{hidden},{layers}"], timeout=1800, env=FIXED_MMAP)
        if "error" in row or "error" in fixed:
            print(f"hidden {hidden} layers {layers} failed: {row.get('error') or fixed['error']}", file=sys.stderr)
            return 1
        rows.append({**row, "peak_extra_bytes_fixed_mmap": fixed["peak_extra_bytes"]})
        print(rows[-1], flush=True)
    import torch

    print(f"\nrandom LLaMA configs (vocab {VOCAB}), fp32, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| hidden | layers | params | weights MB | discovery s | importance s (10x64) | "
          "peak extra MB, glibc default (/ weights) | peak extra MB, mmap 64 KiB (/ weights) | model: 4 P_s MB (/ weights) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["layers"] != 8, r["hidden"], r["layers"])):
        w = r["weights_bytes"]
        cells = [f"{b / 2**20:,.0f} ({b / w:.2f})" for b in
                 (r["peak_extra_bytes"], r["peak_extra_bytes_fixed_mmap"], r["predicted_bytes"])]
        print(f"| {r['hidden']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {w / 2**20:.0f} | "
              f"{r['discover_s']:.1f} | {r['importance_s']:.1f} | " + " | ".join(cells) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
