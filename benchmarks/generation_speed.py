"""How fast the dense model writes its own recovery / refit text: transformers' top-p sampling
(``generate(do_sample=True, top_p=...)``, which sorts the whole vocabulary and draws one random
number per entry at every step) against ``pruner.data.generated.NucleusSampler`` (the same nucleus,
ranked among the top 1,024 tokens, drawn by a logits processor under greedy decoding).

    python benchmarks/generation_speed.py --chunks 16,64 --tokens 48 --top-p 0.95,1.0 --rounds 2

Per chunk size and top_p: seconds to write ``chunk x tokens`` tokens, median of ``--rounds``
rounds after a warm-up, on ``--threads`` threads, and the speed-up. Both samplers draw the same
distribution, not the same tokens. At top_p 1 (the model's whole distribution) transformers skips
its top-p sort but still draws with ``torch.multinomial``; ``NucleusSampler`` ranks nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessorList

import pruner
from pruner.data.generated import PROMPTS, NucleusSampler, encode_left_padded

SAMPLERS = ("transformers", "nucleus")


@torch.no_grad()
def write_chunk(model, tokenizer, sampler: str, size: int, tokens: int, top_p: float = 0.95,
                seed: int = 0) -> torch.Tensor:
    """``size`` sequences of ``tokens`` new tokens from the first prompts, with ``sampler``."""
    enc = encode_left_padded(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(size)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    if sampler == "transformers":
        kwargs = {"do_sample": True, "temperature": 1.0, "top_p": top_p, "top_k": 0}
    else:
        kwargs = {"do_sample": False, "logits_processor": LogitsProcessorList([NucleusSampler(1.0, top_p)])}
    out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad, **kwargs)
    return out[:, enc["input_ids"].shape[1]:]  # (size, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="pruner.load_model name or folder")
    parser.add_argument("--chunks", default="16,64", help="comma-separated chunk sizes (sequences generated together)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per sequence")
    parser.add_argument("--top-p", default="0.95,1.0", help="comma-separated nucleus masses (1.0: no truncation)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per cell, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = pruner.load_model(args.model)
    model.float().eval()
    sizes = [int(c) for c in args.chunks.split(",")]
    masses = [float(p) for p in args.top_p.split(",")]
    print(f"| chunk x tokens | top_p | {' | '.join(SAMPLERS)} | speed-up |")
    print("|---|---|---|---|---|")
    for size in sizes:
        for top_p in masses:
            seconds = {}
            for sampler in SAMPLERS:
                times = []
                for r in range(args.rounds + 1):  # round 0 warms up
                    start = time.perf_counter()
                    write_chunk(model, tokenizer, sampler, size, args.tokens, top_p, seed=r)
                    if r:
                        times.append(time.perf_counter() - start)
                seconds[sampler] = statistics.median(times)
            cells = " | ".join(f"{seconds[s]:.1f} s" for s in SAMPLERS)
            speedup = seconds["transformers"] / seconds["nucleus"]
            print(f"| {size} x {args.tokens} | {top_p:g} | {cells} | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
