"""What a prune call costs, against its floor, on SmolLM2-135M and at LLaMA-7B / 70B shapes.

    python benchmarks/prune_cost.py                       # every table below, ~10 minutes
    python benchmarks/prune_cost.py --parts smollm2 --rounds 5 --output cost.json

Tables (every measurement in a fresh process, so that one run's allocator caches and imports do
not carry into the next):

1. ``smollm2``: ``pruner.prune`` (element1, 20 % of all parameters, KV groups and MLP channels of
   layers 4-27, the paper's local allocation) on the same 10 x 64 calibration tokens as ten
   batches of one sample and as one batch of ten, next to its **floor**: the same forward +
   backward passes with nothing else (only the scored tensors requiring gradients, autograd's
   ``.grad``), one per batch; and, for batches of more than 64 tokens, the floor of the passes
   prune makes (micro-batches of 64 tokens, the memory bound). Each in its own process. The
   overhead ratio is prune / mean floor. Time is measured without the memory sampler (a Python
   thread polling every 2 ms takes a visible share of 2 cores); peak memory comes from separate
   runs: the resident set above the loaded model (sampled every 2 ms) over the weights' bytes,
   with glibc's default allocator and with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks go back
   to the system at once: close to what the tensors need). ``--samples 10,100`` adds larger
   calibration sets (ten-sample batches).
2. ``shapes``: LLaMA-7B- and LLaMA-70B-shaped models on the meta device (no weights; vocabulary
   256): group discovery, then with random scores selection + plan building (local and global
   allocation) and surgery planning (the removed index sets of every tensor).
3. ``obs``: greedy OBS over SmolLM2's MLP channels (down_proj's real input statistics from the
   calibration text, 649 of 1536 channels removed as the 20 % plan does), the blocked
   ``pruner.refit.obs.greedy_obs`` against the eager rank-one downdate of both matrices at
   every step (as it was written before): seconds per layer, and whether the channels agree.
4. ``--torch-pruning``: Torch-Pruning's Taylor importance on the same model and data.

Calibration text: ``../shared/data/gutenberg`` (builtin text without it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _child import FIXED_MMAP, run_child  # benchmarks/ is on sys.path when a script here runs
from _sources import calibration_source

PRUNE = dict(criterion="element1", target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28),
             global_ranking=False, head_granularity="kv")  # local, as docs/results.md's figures (not the default)
SHAPES = {  # LLaMA-2 7B (MHA) and 70B (GQA 64:8)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}


def _calibration(tok, n: int):
    from pruner.data import calibration_samples

    source = calibration_source()
    return calibration_samples(source, tok, n, 64, seed=0)


def _layout(samples, layout: str) -> list:
    n = len(samples)
    size = 1 if layout == "1-sample batches" else 10
    return [samples[i: i + size] for i in range(0, n, size)]


def one_smollm2(n: int, layout: str, what: str) -> dict:
    """``what`` = "prune": the whole call, timed; "memory": the whole call with its peak memory
    sampled; "floor": the same forward + backward passes alone, one per batch, gradients only
    where prune needs them; "floor-micro": the same, in prune's 64-token micro-batches. Each in
    its own process, after the same one-sample no-grad forward (thread pools and kernels start
    before the clock)."""
    import torch

    import pruner
    from pruner.loop import families_for
    from pruner.config import PruneConfig
    from pruner.eval.efficiency import peak_memory, weights_bytes

    model, tok = pruner.load_model("smollm2")
    batches = _layout(_calibration(tok, n), layout)
    with torch.no_grad():
        model(batches[0][:1])
    row = {"part": "smollm2", "samples": n, "layout": layout, "threads": torch.get_num_threads()}
    if what in ("floor", "floor-micro"):
        from pruner.batches import MICRO_BATCH_TOKENS

        scored = {m.param for f in families_for(pruner.discover(model), PruneConfig(**PRUNE)) for m in f.members}
        for name, p in model.named_parameters():
            p.requires_grad_(name in scored)
        size = max(1, MICRO_BATCH_TOKENS // batches[0].shape[1]) if what == "floor-micro" else None
        start = time.perf_counter()
        for b in batches:
            for part in ([b] if size is None else b.split(size)):
                (model(input_ids=part, labels=part).loss * len(part)).backward()
        return {**row, f"{what}_s": time.perf_counter() - start}
    model_bytes = weights_bytes(model)
    if what == "prune":
        start = time.perf_counter()
        plan = pruner.prune(model, batches, **PRUNE)
        return {**row, "prune_s": time.perf_counter() - start, "removed": plan.params["removed_fraction"]}
    plan, peak = peak_memory(lambda: pruner.prune(model, batches, **PRUNE))
    return {**row, "peak_extra_bytes": peak, "model_bytes": model_bytes, "removed": plan.params["removed_fraction"]}


def meta_llama(shape: str):
    """A LLaMA of ``shape`` whose weights live on the meta device (no memory), except what
    discovery's probe runs on: the embeddings, layer 0's norms and the rotary tables."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, max_position_embeddings=64, **SHAPES[shape])
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    model.model.embed_tokens = torch.nn.Embedding(256, cfg.hidden_size)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
        norm.weight = torch.nn.Parameter(torch.ones(cfg.hidden_size))
    return model.eval()


def one_shape(shape: str) -> dict:
    import torch

    import pruner
    from pruner.loop import families_for
    from pruner.config import PruneConfig
    from pruner.loop import make_plan
    from pruner.structure import removed_slices

    model = meta_llama(shape)
    start = time.perf_counter()
    structure = pruner.discover(model)
    row = {"part": "shapes", "shape": shape, "discover_s": time.perf_counter() - start,
           "params": sum(p.numel() for p in model.parameters())}
    for allocation, global_ranking in (("local", False), ("global", True)):
        cfg = PruneConfig(target_sparsity=0.2, global_ranking=global_ranking)
        g = torch.Generator().manual_seed(0)
        vectors = {(m.param, m.dim): torch.rand(structure.shapes[m.param][m.dim], generator=g)
                   for f in families_for(structure, cfg) for m in f.members}
        start = time.perf_counter()
        plan = make_plan(structure, vectors, cfg, row["params"])
        row[f"{allocation}_plan_s"] = time.perf_counter() - start
        start = time.perf_counter()
        removed_slices(plan, structure)
        row[f"{allocation}_surgery_s"] = time.perf_counter() - start
        row[f"{allocation}_layers_pruned"] = sum(lp.heads_kept is not None or lp.mlp_channels_kept is not None
                                                  for lp in plan.layers)
    return row


def one_obs(layers: int) -> dict:
    import torch

    import pruner
    from pruner.refit import GramCollector, greedy_obs
    from pruner.refit.obs import greedy_obs_eager

    model, tok = pruner.load_model("smollm2")
    samples = _calibration(tok, 10)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4, 4 + layers)]
    collector = GramCollector(model, names)
    collector.attach()
    with torch.no_grad():
        model(samples)
    collector.detach()
    n_remove = 649  # what the 20 % plan removes from each of these layers' 1536 channels
    eager_s, blocked_s, same = [], [], []
    for name in names:
        gram = collector.grams[name] / collector.tokens[name]  # (1536, 1536)
        h = gram + 0.1 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        h_inv = torch.linalg.inv(h)
        w = model.get_submodule(name).weight.detach().double()  # (576, 1536)
        start = time.perf_counter()
        a = greedy_obs_eager(h_inv.clone(), w.clone(), n_remove)
        eager_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = greedy_obs(h_inv.clone(), w.clone(), n_remove)
        blocked_s.append(time.perf_counter() - start)
        same.append(bool(torch.equal(a, b)))
    return {"part": "obs", "layers": layers, "eager_s": eager_s, "blocked_s": blocked_s, "same_channels": same}


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
    return {"part": "torch-pruning", "samples": n, "prune_s": time.perf_counter() - start, "peak_extra_bytes": peak,
            "model_bytes": model_bytes, "removed": 1 - pruner.count_parameters(model) / before,
            "threads": torch.get_num_threads()}


def _print_tables(rows: list[dict]) -> None:
    import torch

    print(f"\n{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32, {time.strftime('%Y-%m-%d')}")
    smol = [r for r in rows if r.get("part") == "smollm2" and "error" not in r]
    if smol:
        print("\nSmolLM2-135M, element1, -20 %, layers 4-27 (KV groups + MLP channels), local allocation")
        print("| samples x 64 | layout | rounds | floor s (a pass per batch) | prune s | prune / floor | "
              "floor s (prune's 64-token passes) | prune / that floor | removed |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key in sorted({(r["samples"], r["layout"]) for r in smol if "prune_s" in r}):
            same = [r for r in smol if (r["samples"], r["layout"]) == key]
            prune = [r["prune_s"] for r in same if "prune_s" in r]
            cells = []
            for kind in ("floor_s", "floor-micro_s"):
                floor = [r[kind] for r in same if kind in r]
                if not floor and kind == "floor-micro_s":  # batches of <= 64 tokens: the same passes
                    floor = [r["floor_s"] for r in same if "floor_s" in r]
                mean = sum(floor) / len(floor) if floor else float("nan")
                cells += [_span(floor) if floor else "-", _span([p / mean for p in prune])]
            removed = next(r["removed"] for r in same if "removed" in r)
            print(f"| {key[0]} | {key[1]} | {len(prune)} | {cells[0]} | {_span(prune)} | {cells[1]} | {cells[2]} | "
                  f"{cells[3]} | {removed:.2%} |")
        print("\nPeak resident memory above the loaded model during prune (separate, sampled runs)")
        print("| samples x 64 | layout | allocator | rounds | peak extra MB | / weights (max) |")
        print("|---|---|---|---|---|---|")
        for key in sorted({(r["samples"], r["layout"], r["allocator"]) for r in smol if "peak_extra_bytes" in r}):
            runs = [r for r in smol if (r["samples"], r["layout"], r["allocator"]) == key and "peak_extra_bytes" in r]
            peak = [r["peak_extra_bytes"] for r in runs]
            print(f"| {key[0]} | {key[1]} | {key[2]} | {len(runs)} | {_span([p / 2**20 for p in peak], '.0f')} | "
                  f"{max(peak) / runs[0]['model_bytes']:.2f} |")
    for r in (r for r in rows if r.get("part") == "torch-pruning"):
        tail = r["error"] if "error" in r else (f"{r['prune_s']:.1f} s, peak extra {r['peak_extra_bytes'] / 2**20:,.0f} MB "
                                                f"({r['peak_extra_bytes'] / r['model_bytes']:.2f}x weights), {r['removed']:.1%} removed")
        print(f"\nTorch-Pruning (GroupTaylorImportance), {r['samples']} samples, {r['allocator']}: {tail}")
    shapes = [r for r in rows if r.get("part") == "shapes"]
    if shapes:
        print("\nLLaMA shapes on the meta device, random scores, -20 % of all parameters")
        print("| shape | params | discovery s | allocation | selection + plan s | surgery planning s | layers pruned |")
        print("|---|---|---|---|---|---|---|")
        for r in shapes:
            if "error" in r:
                print(f"| {r['shape']} | - | - | - | - | - | {r['error']} |")
                continue
            for allocation in ("local", "global"):
                print(f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['discover_s']:.1f} | {allocation} | "
                      f"{r[f'{allocation}_plan_s']:.2f} | {r[f'{allocation}_surgery_s']:.2f} | "
                      f"{r[f'{allocation}_layers_pruned']} |")
    for r in (r for r in rows if r.get("part") == "obs"):
        if "error" in r:
            print(f"\nOBS: {r['error']}")
            continue
        eager, blocked = sum(r["eager_s"]), sum(r["blocked_s"])
        print(f"\nGreedy OBS, SmolLM2 down_proj of {r['layers']} layers (649 of 1536 channels each): eager "
              f"{eager / r['layers']:.2f} s/layer, blocked {blocked / r['layers']:.2f} s/layer, speed-up "
              f"{eager / blocked:.1f}x, same channels in {sum(r['same_channels'])}/{r['layers']} layers")


def _span(values: list[float], fmt: str = ".2f") -> str:
    """mean (min-max) of several rounds."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="smollm2,shapes,obs", help="comma-separated: smollm2, shapes, obs")
    p.add_argument("--samples", default="10", help="calibration sets for the smollm2 table, e.g. 10,100")
    p.add_argument("--rounds", type=int, default=2, help="fresh-process repeats of each smollm2 row")
    p.add_argument("--shapes", default="7b,70b")
    p.add_argument("--obs-layers", type=int, default=3)
    p.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning (pip install torch-pruning)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--output", default=None)
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {"smollm2": lambda n, layout, what: one_smollm2(int(n), layout, what), "shape": one_shape,
              "obs": lambda n: one_obs(int(n)), "torch-pruning": lambda n: one_torch_pruning(int(n))}[kind]
        print(json.dumps(fn(*rest)), flush=True)
        return 0
    parts = set(args.parts.split(","))
    jobs: list[tuple[list[str], dict | None, dict]] = []
    if "smollm2" in parts:
        for n in (int(x) for x in args.samples.split(",")):
            for layout in ("1-sample batches", "10-sample batches"):
                whats = [("floor", None), ("prune", None)]
                if layout != "1-sample batches":  # batches above 64 tokens: prune micro-batches them
                    whats.insert(1, ("floor-micro", None))
                for _ in range(args.rounds):  # floors and prune alternate, so drift hits them alike
                    for what, env in whats:
                        jobs.append((["smollm2", str(n), layout, what], env,
                                     {"part": "smollm2", "samples": n, "layout": layout}))
                for env in (None, FIXED_MMAP):  # memory: sampled runs of their own
                    jobs.append((["smollm2", str(n), layout, "memory"], env,
                                 {"part": "smollm2", "samples": n, "layout": layout}))
    if args.torch_pruning:
        jobs.append((["torch-pruning", "10"], None, {"part": "torch-pruning", "samples": 10}))
    if "shapes" in parts:
        jobs += [(["shape", s], None, {"part": "shapes", "shape": s}) for s in args.shapes.split(",")]
    if "obs" in parts:
        jobs.append((["obs", str(args.obs_layers)], None, {"part": "obs"}))
    rows = []
    for child_args, env, what in jobs:
        row = run_child(__file__, ["--child", *child_args], args.timeout, env)
        row = {**what, **row, "allocator": "mmap threshold 64 KiB" if env else "glibc default"}
        rows.append(row)
        print(row, flush=True)
    _print_tables(rows)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
