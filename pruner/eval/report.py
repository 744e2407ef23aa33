"""Side-by-side evaluation of models (dense vs pruned) and the Markdown / JSON / PNG report.

Example:
    >>> from pruner.eval.report import compare, write_report  # doctest: +SKIP
    >>> results = compare({"dense": (dense, tok), "pruned": (pruned, tok)},
    ...                   wikitext="../shared/data/wikitext2_raw/wiki.test.raw",
    ...                   zeroshot_dir="../shared/data/zeroshot", limit=200)  # doctest: +SKIP
    >>> write_report(results, "report/", plan=json.load(open("plan.json")))  # doctest: +SKIP
    {'results.json': ..., 'report.md': ..., 'plan_heads.png': ..., ...}
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from pruner.eval.efficiency import efficiency
from pruner.structure import count_parameters
from pruner.data import load_wikitext2_rows, resolve_protocol
from pruner.eval.perplexity import perplexity
from pruner.eval.zeroshot import LOCAL_TASKS, evaluate_zeroshot, lm_eval_version

PROTOCOL_TEXT = {"paper": "no BOS in any window (the LLM-Pruner protocol)",
                 "bos": "each window after the tokenizer's BOS"}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, you first",
]
TASK_TITLES = {
    "piqa": "PIQA",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "openbookqa": "OBQA",
}


@torch.no_grad()
def generate_samples(
    model, tokenizer, prompts: list[str], new_tokens: int = 32, seed: int = 0, temperature: float = 0.8
) -> list[dict[str, str]]:
    """Greedy and seeded sampled (temperature, top-p 0.95) continuations of each prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        texts = {}
        for mode in ("greedy", "sampled"):
            # Re-seeding before each prompt makes a sample independent of the prompts before it.
            torch.manual_seed(seed)
            sample = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0}
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                pad_token_id=pad,
                **(sample if mode == "sampled" else {"do_sample": False}),
            )
            texts[mode] = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append({"prompt": prompt, **texts})
    return rows


def compare(
    models: dict[str, tuple[Any, Any]],
    wikitext: str | Path | list[str] | None = None,
    zeroshot_dir: str | Path | None = None,
    tasks: list[str] | tuple[str, ...] = LOCAL_TASKS,
    limit: int | None = None,
    max_tokens: int | None = 32768,
    seq_len: int = 128,
    batch_size: int = 8,
    prompts: list[str] | None = None,
    new_tokens: int = 32,
    latency: dict | None = None,
    backend: str = "auto",
    progress: bool = False,
    protocol: str = "auto",
) -> dict:
    """Evaluates each ``name: (model, tokenizer)`` and returns a JSON-ready dict.

    ``wikitext``: a ``wiki.test.raw`` path or ready rows (None: skip perplexity).
    ``zeroshot_dir``: folder of ``<task>.jsonl``, ``"hub"`` for lm-eval's hub tasks (internet),
    None to skip zero-shot. ``latency``: keyword
    arguments of :func:`pruner.eval.efficiency.measure_latency` (``batch_size``, ``seq_len``,
    ``new_tokens``, ``repeats``); ``{"skip": True}`` leaves latency out. ``prompts=[]`` skips
    the generation samples. ``protocol``: the perplexity windows' protocol (``"auto"``,
    ``"paper"``, ``"bos"``: :mod:`pruner.data.windows`); each model's result names the one that
    ran for its tokenizer (``wikitext2_protocol``).
    """
    rows = load_wikitext2_rows(wikitext) if isinstance(wikitext, (str, Path)) else wikitext
    latency = {"seq_len": 64, "batch_size": 1, "new_tokens": 32, "repeats": 3, **(latency or {})}
    prompts = DEFAULT_PROMPTS if prompts is None else prompts
    out: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "lm_eval": lm_eval_version(),
            "machine": platform.machine(),
            "settings": {
                "seq_len": seq_len,
                "max_tokens": max_tokens,
                "protocol": protocol,
                "tasks": list(tasks) if zeroshot_dir else [],
                "limit": limit,
                "latency": latency,
            },
        },
        "models": {},
    }
    for name, (model, tokenizer) in models.items():
        res: dict[str, Any] = {"parameters": count_parameters(model)}
        if rows is not None:
            res["wikitext2_ppl"] = perplexity(
                model, tokenizer, rows, seq_len, max_tokens, batch_size, progress, protocol
            )
            res["wikitext2_protocol"] = resolve_protocol(tokenizer, protocol)[0]
        if zeroshot_dir is not None:
            data_dir = None if str(zeroshot_dir) == "hub" else zeroshot_dir
            res["zeroshot"] = evaluate_zeroshot(
                model, tokenizer, tasks, data_dir, limit, batch_size, progress, backend
            )
        if not latency.get("skip"):
            res["efficiency"] = efficiency(
                model,
                tokenizer,
                seq_len=latency["seq_len"],
                batch_size=latency["batch_size"],
                new_tokens=latency["new_tokens"],
                repeats=latency["repeats"],
            )
        if prompts:
            res["generations"] = generate_samples(model, tokenizer, prompts, new_tokens)
        out["models"][name] = res
    return out


# --------------------------------------------------------------------------- Markdown


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_tables(results: dict) -> str:
    """The Markdown tables of a :func:`compare` result (accuracy table, zero-shot detail,
    efficiency table), also printed by the CLI."""
    models = results.get("models", {})
    if not models:
        return "(no models evaluated)"
    # "removed" is relative to the first model (the dense one of --compare); a model alone has
    # nothing to be compared with, and "0.0%" would read as "nothing pruned".
    base = next(iter(models.values())).get("parameters") if len(models) > 1 else None
    tasks = []
    for res in models.values():
        tasks += [t for t in res.get("zeroshot", {}) if t not in tasks]

    header = ["model", "params", "removed", "WikiText-2 PPL"]
    header += [f"{TASK_TITLES.get(t, t)} acc" for t in tasks] + (["mean acc"] if tasks else [])
    rows = []
    for name, res in models.items():
        params = res.get("parameters")
        removed = 1 - params / base if params and base else None
        accs = [res.get("zeroshot", {}).get(t, {}).get("acc") for t in tasks]
        known = [a for a in accs if a is not None]
        row = [name, _fmt(params), f"{removed:.1%}" if removed is not None else "–"]
        row += [_fmt(res.get("wikitext2_ppl"))] + [_fmt(100 * a if a is not None else None, 1) for a in accs]
        row += [_fmt(100 * sum(known) / len(known), 1) if known else "–"] if tasks else []
        rows.append(row)
    parts = ["## Quality\n", _table(header, rows)]
    settings = results.get("meta", {}).get("settings", {})
    parts.append(
        f"\nPerplexity: WikiText-2 raw test, first {_fmt(settings.get('max_tokens'))} tokens, "
        f"windows of {settings.get('seq_len')} tokens"
        + "".join(f"; {name}: {PROTOCOL_TEXT.get(res.get('wikitext2_protocol'), 'protocol not recorded')}"
                  for name, res in models.items() if res.get("wikitext2_ppl") is not None)
        + ". Accuracies in %."
    )

    if tasks:
        detail = []
        for name, res in models.items():
            for t, r in res.get("zeroshot", {}).items():
                detail.append(
                    [name, TASK_TITLES.get(t, t), _fmt(100 * r["acc"], 2),
                     _fmt(100 * r["acc_norm"], 2) if r.get("acc_norm") is not None else "–",
                     _fmt(r.get("n")), str(r.get("backend")), _fmt(r.get("seconds"), 1)]
                )
        parts += ["\n### Zero-shot detail\n",
                  _table(["model", "task", "acc", "acc_norm", "items", "backend", "seconds"], detail)]

    eff = [(n, r["efficiency"]) for n, r in models.items() if "efficiency" in r]
    if eff:
        e0 = eff[0][1]
        header = ["model", "params", "MACs/token (M)", "prefill tok/s", "generate tok/s",
                  "decode tok/s", "weights (MB)", "generate peak extra (MB)"]
        rows = [[n, _fmt(e["parameters"]), _fmt(e["macs_per_token"] / 1e6, 1),
                 _fmt(e["prefill_tokens_per_s"], 0), _fmt(e["generate_tokens_per_s"], 1),
                 _fmt(e["decode_tokens_per_s"], 1), _fmt(e.get("weights_mb"), 1),
                 _fmt(e["peak_memory_mb"], 1)] for n, e in eff]
        device = results.get("meta", {}).get("device", "cpu")
        # a CPU is often shared with other work (CI, a laptop): its speeds only compare within one run
        caveat = " (on a shared CPU, compare speeds only within one run)" if device == "cpu" else ""
        parts += ["\n## Efficiency\n", _table(header, rows),
                  f"\nOn {device}: batch {e0['batch_size']}, prompt {e0['seq_len']} tokens, {e0['new_tokens']} "
                  f"greedy new tokens with KV cache; medians of repeated runs{caveat}. Peak extra: memory above "
                  "the loaded model during the first `generate` call (CPU: RSS, approximate)."]
    return "\n".join(parts)


def format_generations(results: dict) -> str:
    """Markdown: for each prompt, each model's greedy and sampled continuation."""
    models = {n: r["generations"] for n, r in results.get("models", {}).items() if r.get("generations")}
    if not models:
        return ""
    parts = ["## Generations\n", "Greedy and sampled (seeded, temperature 0.8, top-p 0.95).\n"]
    prompts = [g["prompt"] for g in next(iter(models.values()))]
    for k, prompt in enumerate(prompts):
        rows = []
        for name, gens in models.items():
            if k < len(gens):
                clean = lambda s: s.replace("|", "\\|").replace("\n", " ⏎ ")
                rows.append([name, clean(gens[k]["greedy"]), clean(gens[k]["sampled"])])
        parts += [f"\n**{prompt}**\n", _table(["model", "greedy", "sampled"], rows)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


def _kept(layer: dict, key: str, dense: int | None) -> int:
    if layer.get("removed"):
        return 0
    kept = layer.get(key)
    if isinstance(kept, list):
        return len(kept)
    if isinstance(kept, int):
        return kept
    return dense or 0  # a plan that does not mention this part keeps it whole


def plot_plan(plan: dict, folder: str | Path) -> dict[str, Path]:
    """PNG plots of a pruning plan: kept heads per layer, kept MLP channels per layer and the
    importance-score histogram with the cut line. Missing plan parts are skipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    folder = Path(folder)
    dense = plan.get("model") or {}
    layers = sorted(plan.get("layers") or [], key=lambda l: l.get("index", 0))
    written = {}
    if layers:
        x = [l.get("index", k) for k, l in enumerate(layers)]
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(x)), 3.5))
        q = [_kept(l, "attention_heads_kept", dense.get("num_attention_heads")) for l in layers]
        kv = [_kept(l, "kv_heads_kept", dense.get("num_key_value_heads")) for l in layers]
        ax.bar([i - 0.2 for i in x], q, width=0.4, label="query heads")
        ax.bar([i + 0.2 for i in x], kv, width=0.4, label="key/value heads")
        if dense.get("num_attention_heads"):
            ax.axhline(dense["num_attention_heads"], color="gray", ls="--", lw=1, label="dense query heads")
        ax.set(xlabel="layer", ylabel="kept heads", title="Attention heads kept per layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["plan_heads.png"] = folder / "plan_heads.png"
        fig.savefig(written["plan_heads.png"], dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(x)), 3.5))
        ax.bar(x, [_kept(l, "mlp_channels_kept", dense.get("intermediate_size")) for l in layers])
        if dense.get("intermediate_size"):
            ax.axhline(dense["intermediate_size"], color="gray", ls="--", lw=1, label="dense")
            ax.legend(fontsize=8)
        ax.set(xlabel="layer", ylabel="kept channels", title="MLP channels kept per layer")
        fig.tight_layout()
        written["plan_mlp.png"] = folder / "plan_mlp.png"
        fig.savefig(written["plan_mlp.png"], dpi=100)
        plt.close(fig)

    by_kind: dict[str, list[tuple[float, bool]]] = {}
    for g in plan.get("groups") or []:  # one record per family: kind, layer, scores, removed
        for score, removed in zip(g.get("scores") or [], g.get("removed") or []):
            if isinstance(score, (int, float)) and math.isfinite(score):
                by_kind.setdefault(str(g.get("kind", "group")), []).append((float(score), bool(removed)))
    if by_kind:
        # One panel per group kind: scores of heads and MLP channels are on different scales.
        fig, axes = plt.subplots(1, len(by_kind), figsize=(4 * len(by_kind), 3.2), squeeze=False)
        for ax, (kind, items) in zip(axes[0], sorted(by_kind.items())):
            kept = [s for s, r in items if not r]
            removed = [s for s, r in items if r]
            scores = [s for s, _ in items]
            bins: int | list[float] = 30 if len(items) > 30 else max(5, len(items))
            if min(scores) > 0 and max(scores) / min(scores) > 100:
                # Heavy-tailed scores (MLP channels): log-spaced bins show the low end.
                lo, hi = math.log10(min(scores)), math.log10(max(scores))
                bins = [10 ** (lo + (hi - lo) * k / 30) for k in range(31)]
                ax.set_xscale("log")
            ax.hist([kept, removed], bins=bins, stacked=True, label=["kept", "removed"],
                    color=["tab:blue", "tab:red"])
            if removed and kept and max(removed) <= min(kept):
                # A single global threshold separates removed from kept groups.
                cut = (max(removed) + min(kept)) / 2
                ax.axvline(cut, color="black", ls="--", lw=1, label=f"cut {cut:.3g}")
            elif removed:
                # Per-layer (local) selection: no single threshold; show the highest removed.
                ax.axvline(max(removed), color="black", ls=":", lw=1,
                           label=f"highest removed {max(removed):.3g}")
            ax.set(title=f"{kind} ({len(removed)}/{len(items)} removed)", xlabel="importance score")
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("groups")
        fig.tight_layout()
        written["plan_scores.png"] = folder / "plan_scores.png"
        fig.savefig(written["plan_scores.png"], dpi=100)
        plt.close(fig)
    return written


def write_report(results: dict, folder: str | Path, plan: dict | None = None) -> dict[str, Path]:
    """Writes ``results.json``, ``report.md`` and, with a plan, its PNG plots into ``folder``;
    returns ``{file name: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"results.json": folder / "results.json", "report.md": folder / "report.md"}
    written["results.json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots = plot_plan(plan, folder) if plan else {}
    written.update(plots)
    meta = results.get("meta", {})
    md = ["# Evaluation report\n",
          f"{meta.get('date', '')} · torch {meta.get('torch', '?')} · lm-eval {meta.get('lm_eval') or 'not installed'}\n",
          format_tables(results)]
    gens = format_generations(results)
    if gens:
        md += ["", gens]
    if plots:
        md += ["\n## Pruning plan\n"] + [f"![{name}]({name})" for name in plots]
    written["report.md"].write_text("\n".join(md) + "\n")
    return written
