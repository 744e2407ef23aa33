"""SmolLM2-135M in llama.cpp: dense vs pruned (-20 %, -50 % of all parameters), exported with
``pruner.export_gguf`` in f16, q8_0 and q4_1 (the wheel's own format), next to the wheel's own
dense Q4_1 file; speed and WikiText-2 perplexity measured in llama.cpp itself.

    python benchmarks/llamacpp_speed.py --output llamacpp.json     # needs llama-cpp-python

Per file: prompt processing tokens/s (one 256-token prompt) and generation tokens/s (64 greedy
tokens after it), median of ``--rounds`` rounds after a warm-up, ``--threads`` threads (same for
every file); perplexity on ``--windows`` non-overlapping 128-token windows of WikiText-2 test
(LLM-Pruner's protocol; ``../shared/data``, builtin held-out text without it), logits from
llama.cpp. Pruning: element1 on 10 x 64 calibration tokens, KV groups and MLP channels, global
ranking, widths rounded to 32 (whole quantization blocks); -20 % in layers 4-27, -50 % in layers
1-28 with at most 90 % of a layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

from _sources import calibration_source, wikitext2_rows  # benchmarks/ is on sys.path when a script here runs



def _llama(path: Path, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def speed(path: Path, prompt: list[int], threads: int, rounds: int, new_tokens: int = 64) -> dict:
    import llama_cpp
    import numpy as np

    llm = _llama(path, threads)
    pp, tg = [], []
    for r in range(rounds + 1):  # round 0 warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):  # greedy: the argmax of the last position's logits
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])
        gen_s = time.perf_counter() - start
        if r:
            pp.append(len(prompt) / prompt_s)
            tg.append(new_tokens / gen_s)
    return {"prompt_tok_s": statistics.median(pp), "gen_tok_s": statistics.median(tg),
            "prompt_range": [min(pp), max(pp)], "gen_range": [min(tg), max(tg)]}


def perplexity(path: Path, windows, threads: int) -> float:
    import numpy as np

    llm = _llama(path, threads, logits_all=True)
    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # (T-1, vocab)
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.2,0.5")
    p.add_argument("--dtypes", default="f16,q8_0,q4_1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=40, help="128-token perplexity windows (0: skip perplexity)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    import pruner
    from pruner.data import calibration_samples, eval_windows
    from pruner.io.models import smollm2_folder, SMOLLM2_GGUF

    dense, tok = pruner.load_model("smollm2")
    rows = wikitext2_rows()
    windows = eval_windows(rows, tok, 128)[: args.windows]
    source = calibration_source()
    cal = calibration_samples(source, tok, 10, 64, seed=0)
    prompt = eval_windows(rows, tok, 256)[0].tolist()
    models = {"dense": dense}
    for target in (float(t) for t in args.targets.split(",")):
        span = (4, 28) if target <= 0.3 else (1, 29)
        model = copy.deepcopy(dense)
        pruner.prune(model, [cal[i: i + 1] for i in range(len(cal))], target_sparsity=target, global_ranking=True,
                     attention_layers=span, mlp_layers=span, head_granularity="kv", round_to=32,
                     max_layer_ratio=0.9 if target > 0.3 else 1.0)
        models[f"-{target:.0%}"] = model
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [("dense (wheel's file)", "Q4_1", smollm2_folder() / SMOLLM2_GGUF, pruner.count_parameters(dense))]
        for name, model in models.items():
            for dtype in args.dtypes.split(","):
                path = Path(tmp) / f"{name}.{dtype}.gguf"
                pruner.export_gguf(model, path, dtype=dtype, tokenizer="smollm2")
                files.append((name, dtype, path, pruner.count_parameters(model)))
        for name, dtype, path, params in files:
            row = {"model": name, "dtype": dtype, "params": params, "mib": path.stat().st_size / 2**20,
                   **speed(path, prompt, args.threads, args.rounds)}
            if args.windows:
                row["ppl"] = perplexity(path, windows, args.threads)
            results.append(row)
            print(row, flush=True)
    import llama_cpp

    print(f"\nSmolLM2-135M in llama.cpp (llama-cpp-python {llama_cpp.__version__}), {platform.machine()} CPU, "
          f"{args.threads} threads, median of {args.rounds} rounds, {time.strftime('%Y-%m-%d')}")
    print(f"| model | type | params | file MiB | prompt tok/s (256) | generation tok/s (64) | "
          f"WikiText-2 ppl ({len(windows)} x 128) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        print(f"| {r['model']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['mib']:.0f} | {r['prompt_tok_s']:,.0f} "
              f"({r['prompt_range'][0]:,.0f}-{r['prompt_range'][1]:,.0f}) | {r['gen_tok_s']:.1f} "
              f"({r['gen_range'][0]:.1f}-{r['gen_range'][1]:.1f}) | {ppl} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
