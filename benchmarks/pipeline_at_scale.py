"""Pruning at published shapes with random weights: peak memory above the weights and time per
stage, for the paper's pipeline and the best one, each run in a fresh process.

    python benchmarks/pipeline_at_scale.py --shape llama-3.2-1b --dtype float32 --pipeline paper
    python benchmarks/pipeline_at_scale.py --shape llama-3.2-1b --dtype float32 --pipeline best
    python benchmarks/pipeline_at_scale.py --shape llama-2-7b --dtype bfloat16 --pipeline paper
    python benchmarks/pipeline_at_scale.py --shape llama-2-7b --dtype bfloat16 --pipeline paper \
        --activation-checkpointing
    python benchmarks/pipeline_at_scale.py --shape llama-2-7b --dtype bfloat16 --pipeline best --mlp-layers 4 6

``--mlp-layers A B`` (best pipeline) walks layers A..B-1 only, each losing the share of its MLP
channels that the whole-range target takes (``--ratio``, 0.37 at the 7B shape): the time and
memory of a few layers, to extrapolate to the whole range where a full run is too long here.

Pipelines (both remove 20 % of all parameters):

* ``paper``: element1 from 10 x 64 calibration tokens in ONE backward (the importance is reduced
  as each weight's gradient is produced), block-wise heads and MLP channels, the same ratio in
  layers 4..L-2, no refit;
* ``best``: MLP channels only, the same count in layers 4..L-2, chosen by OBS and refit by least
  squares, then the regional fit (1 epoch), on ``--text`` windows of 128 tokens, walked one layer
  at a time.

Peak memory is the resident set above the loaded model, sampled every 2 ms, with freed blocks
returned to the system at once (``MALLOC_MMAP_THRESHOLD_=65536``: the figure tracks what the
tensors need), as a multiple of the loaded (dense) model's weight bytes. Prints one table row per run and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from _child import FIXED_MMAP, run_child  # benchmarks/ is on sys.path when a script here runs

SHAPES = {  # the published configs' sizes; a 32K vocabulary (the issue's Llama-3.2-1B-like model)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=32000, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=256, tie_word_embeddings=False),
}


def build(shape: str, dtype_name: str):
    """A random LlamaForCausalLM at ``shape``, made directly in ``dtype`` (no fp32 copy first)."""
    import torch
    import transformers as tf

    dtype = getattr(torch, dtype_name)
    config = tf.LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def one(shape: str, dtype_name: str, pipeline: str, text: int, mlp_layers: list[int] | None = None,
        ratio: float = 0.37, checkpointing: bool = False, layer_log: str | None = None) -> dict:
    import torch

    import pruner
    from pruner.eval.efficiency import peak_memory, weights_bytes

    start = time.perf_counter()
    model = build(shape, dtype_name)
    build_s = time.perf_counter() - start
    dense_bytes = weights_bytes(model)  # the loaded (dense) model's: what the peak is a multiple of
    layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, vocab, (10, 64), generator=g)]  # the paper's 10 x 64, one batch
    ranges = dict(attention_layers=(4, layers - 1), mlp_layers=(4, layers - 1))
    if pipeline == "paper":
        options = dict(criterion="element1", target_sparsity=0.2, global_ranking=False, head_granularity="query",
                       **ranges)
        batches = None
    else:
        target = dict(target_sparsity=0.2) if mlp_layers is None else dict(pruning_ratio=ratio)
        if mlp_layers is not None:
            ranges = dict(mlp_layers=tuple(mlp_layers))
        options = dict(criterion="element1", global_ranking=False, prune_attention=False, reconstruct=True,
                       reconstruct_damping=0.01, mlp_selection="obs", regional_epochs=1, **target, **ranges)
        batches = [torch.randint(0, vocab, (4, 128), generator=g) for _ in range(max(1, text // 4))]
    stages: dict[str, float] = {}
    import pruner.loop.session as session_module
    import pruner.loop.steps as steps_module

    def timed(module, name: str, key: str) -> None:  # each stage's seconds, summed over its calls
        original = getattr(module, name)

        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                stages[key] = stages.get(key, 0.0) + time.perf_counter() - t

        setattr(module, name, run)

    timed(session_module, "discover", "discovery_s")
    timed(session_module, "estimate_importance", "importance_s")
    timed(steps_module, "make_plan", "selection_s")
    timed(steps_module, "refit_layer_by_layer", "refit_walk_s")
    timed(steps_module, "apply_plan", "surgery_s")
    layer_peaks = trace_layers(layer_log) if pipeline == "best" else None
    start = time.perf_counter()
    plan, peak = peak_memory(lambda: pruner.prune(model, calibration, max_tokens_per_backward=None,
                                                  reconstruction_batches=batches,
                                                  activation_checkpointing=checkpointing, **options))
    total = time.perf_counter() - start
    return {"shape": shape, "dtype": dtype_name, "pipeline": pipeline, "params": plan.params["before"],
            "removed_fraction": plan.params["removed_fraction"], "weights_bytes": dense_bytes,
            "peak_extra_bytes": peak, "build_s": build_s, "prune_s": total, **stages,
            "text_tokens": sum(b.numel() for b in batches or []), "threads": torch.get_num_threads(),
            "mlp_layers": mlp_layers, "activation_checkpointing": checkpointing,
            **({"layer_peaks": layer_peaks.finish()} if layer_peaks is not None else {})}


class trace_layers:
    """The resident set's peak above the loaded model between one walked layer's surgery and the
    next (``[layer, seconds since the start, peak extra bytes]`` per layer, also appended to
    ``log`` as it goes, if given): whether the walk's memory grows with the number of layers walked."""

    def __init__(self, log: str | None) -> None:
        import threading

        import psutil

        import pruner.refit.walk as walk

        process = psutil.Process()
        self.rss = lambda: process.memory_info().rss
        self.before, self.start = self.rss(), time.perf_counter()
        self.window, self.rows, self.done = 0, [], threading.Event()
        original = walk.apply_layer

        def apply_layer(plan, model, structure, index, *a, **kw):
            result = original(plan, model, structure, index, *a, **kw)
            self.rows.append([index, round(time.perf_counter() - self.start), self.window - self.before])
            if log:
                with open(log, "a") as f:
                    f.write(f"layer {index}: {self.rows[-1][1]} s, peak extra {self.rows[-1][2] / 2**30:.2f} GiB\n")
            self.window = 0
            return result

        walk.apply_layer = apply_layer
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.is_set():
            self.window = max(self.window, self.rss())
            self.done.wait(0.002)

    def finish(self) -> list:
        self.done.set()
        self.thread.join()
        return self.rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--pipeline", choices=("paper", "best"), default="paper")
    p.add_argument("--text", type=int, default=32, help="best pipeline: refit windows of 128 tokens (default 32)")
    p.add_argument("--mlp-layers", type=int, nargs=2, metavar=("A", "B"),
                   help="best pipeline: walk layers A..B-1 only, each losing --ratio of its MLP channels")
    p.add_argument("--ratio", type=float, default=0.37, help="with --mlp-layers: the share of channels (default 0.37)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="the calibration backward recomputes each decoder layer instead of keeping its activations")
    p.add_argument("--layer-log", help="best pipeline: append each walked layer's time and peak to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.shape, args.dtype, args.pipeline, args.text, args.mlp_layers, args.ratio,
                             args.activation_checkpointing, args.layer_log)), flush=True)
        return 0
    extra = ["--mlp-layers", *map(str, args.mlp_layers), "--ratio", str(args.ratio)] if args.mlp_layers else []
    extra += ["--activation-checkpointing"] if args.activation_checkpointing else []
    extra += ["--layer-log", args.layer_log] if args.layer_log else []
    row = run_child(__file__, ["--child", "--shape", args.shape, "--dtype", args.dtype, "--pipeline", args.pipeline,
                               "--text", str(args.text), *extra], timeout=6 * 3600, env=FIXED_MMAP)
    if "error" in row:
        print(f"failed: {row['error']}", file=sys.stderr)
        return 1
    w = row["weights_bytes"]
    print(f"{platform.machine()} CPU, {row['threads']} threads, {time.strftime('%Y-%m-%d')}")
    stage = lambda key: f"{row[key]:.0f}" if key in row else "-"  # noqa: E731
    print("| shape | dtype | pipeline | params | weights GB | peak extra GB (/ weights) | total s | discovery s | "
          "importance s | selection s | refit walk s (OBS, refit, regional) | surgery s | refit text tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    label = row["pipeline"] + (f" (MLP of layers {row['mlp_layers'][0]}..{row['mlp_layers'][1] - 1} only, "
                               f"{row['removed_fraction']:.1%} removed)" if row.get("mlp_layers") else "")
    label += ", activation checkpointing" if row.get("activation_checkpointing") else ""
    print(f"| {row['shape']} | {row['dtype']} | {label} | {row['params'] / 1e9:.2f}B | {w / 2**30:.2f} | "
          f"{row['peak_extra_bytes'] / 2**30:.2f} ({row['peak_extra_bytes'] / w:.2f}) | {row['prune_s']:.0f} | "
          f"{stage('discovery_s')} | {stage('importance_s')} | {stage('selection_s')} | {stage('refit_walk_s')} | "
          f"{stage('surgery_s')} | {row['text_tokens']:,} |")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
