"""Cost of pruning SmolLM2-135M: wall time and peak memory of calibration + importance +
selection + removal for 10, 100 and 1000 calibration samples of 64 tokens, against the
model's own size; optionally Torch-Pruning's Taylor importance on the same model and data.

    python benchmarks/prune_cost.py --samples 10,100,1000 --torch-pruning --output cost.json

Every measurement runs in a fresh process (so that one run's allocator caches do not hide the
next one's peak): peak resident memory above the RSS after the model is loaded (sampled every
2 ms, ``pruner.eval.efficiency.peak_memory``), divided by the bytes of the model's weights.
pruner runs twice: with glibc's default allocator settings, and with
``MALLOC_MMAP_THRESHOLD_=65536``. The default's threshold grows after the first large free, so
later model-sized temporaries (gradients, sliced weights) come from the heap, which keeps them
resident after they are freed; the fixed threshold returns them to the system at once, so its
column is close to the memory the tensors really need (what a GPU's allocator would report).
Pruning: element1, 20% of all parameters, global ranking over KV groups and MLP channels in
layers 4-27. Calibration text: ``../shared/data/gutenberg`` (builtin text without it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _child import FIXED_MMAP, run_child  # benchmarks/ is on sys.path when a script here runs

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _calibration(tok, n: int):
    from pruner.data import calibration_samples

    source = str(DATA / "gutenberg") if (DATA / "gutenberg").is_dir() else "builtin"
    return calibration_samples(source, tok, n, 64, seed=0)


def one_pruner(n: int) -> dict:
    import torch

    import pruner
    from pruner.eval.efficiency import peak_memory, weights_bytes

    model, tok = pruner.load_model("smollm2")
    samples = _calibration(tok, n)
    model_bytes = weights_bytes(model)

    def run():
        return pruner.prune(model, [samples[i : i + 1] for i in range(n)], criterion="element1", target_sparsity=0.2,
                            attention_layers=(4, 28), mlp_layers=(4, 28), global_ranking=True, head_granularity="kv")

    start = time.perf_counter()
    plan, peak = peak_memory(run)
    seconds = time.perf_counter() - start
    return {"tool": "pruner", "samples": n, "seconds": seconds, "peak_extra_bytes": peak, "model_bytes": model_bytes,
            "removed": plan.params["removed_fraction"], "threads": torch.get_num_threads()}


def one_torch_pruning(n: int) -> dict:
    """Torch-Pruning's own LLM recipe (examples/LLMs/prune_llm.py): GroupTaylorImportance,
    MetaPruner over heads and MLP channels, 20% channel sparsity, lm_head ignored."""
    import torch
    import torch_pruning as tp

    import pruner
    from pruner.eval.efficiency import peak_memory, weights_bytes

    model, tok = pruner.load_model("smollm2")
    samples = _calibration(tok, n)
    model_bytes = weights_bytes(model)
    cfg = model.config
    before = pruner.count_parameters(model)

    def run():
        num_heads = {layer.self_attn.q_proj: cfg.num_attention_heads for layer in model.model.layers}
        num_heads.update({layer.self_attn.k_proj: cfg.num_key_value_heads for layer in model.model.layers})
        num_heads.update({layer.self_attn.v_proj: cfg.num_key_value_heads for layer in model.model.layers})
        pruner_ = tp.pruner.MetaPruner(model, example_inputs=samples[:1], importance=tp.importance.GroupTaylorImportance(),
                                       pruning_ratio=0.2, ignored_layers=[model.lm_head], num_heads=num_heads,
                                       prune_num_heads=False, prune_head_dims=False, global_pruning=False,
                                       output_transform=lambda out: out.logits)
        model.zero_grad()
        for i in range(n):
            model(samples[i : i + 1], labels=samples[i : i + 1]).loss.backward()
        pruner_.step()

    start = time.perf_counter()
    _, peak = peak_memory(run)
    seconds = time.perf_counter() - start
    return {"tool": "torch-pruning", "samples": n, "seconds": seconds, "peak_extra_bytes": peak,
            "model_bytes": model_bytes, "removed": 1 - pruner.count_parameters(model) / before,
            "threads": torch.get_num_threads()}


def _child(kind: str, n: int, timeout: int, env: dict[str, str] | None = None) -> dict:
    row = run_child(__file__, ["--child", kind, "--samples", str(n)], timeout, env)
    row = {"tool": kind, "samples": n, **row} if "error" in row else row
    return {**row, "allocator": "mmap threshold 64 KiB" if env else "glibc default"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="10,100,1000")
    p.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning (pip install torch-pruning)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = one_pruner if args.child == "pruner" else one_torch_pruning
        print(json.dumps(fn(int(args.samples))), flush=True)
        return 0
    rows = []
    for n in (int(x) for x in args.samples.split(",")):
        runs = [("pruner", None), ("pruner", FIXED_MMAP)]
        runs += [("torch-pruning", None)] if args.torch_pruning and n == 10 else []
        for kind, env in runs:
            row = _child(kind, n, args.timeout, env)
            rows.append(row)
            print(row, flush=True)
    import torch

    print(f"\nSmolLM2-135M fp32, {platform.machine()} CPU, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("| tool | allocator | samples x 64 tokens | wall s | peak extra memory MB | / model bytes | removed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tool']} | {r['allocator']} | {r['samples']} | - | - | - | {r['error']} |")
            continue
        print(f"| {r['tool']} | {r['allocator']} | {r['samples']} | {r['seconds']:.1f} | {r['peak_extra_bytes'] / 2**20:,.0f} | "
              f"{r['peak_extra_bytes'] / r['model_bytes']:.2f} | {r['removed']:.1%} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
