"""What bf16 buys on this machine, stage by stage: each of the pipeline's kinds of pass in float32,
under ``torch.autocast(bfloat16)`` (fp32 weights, as ``trainer.precision: bf16-mixed``) and with
bf16 weights (as ``bf16-true`` / ``CausalLMModule(dtype="bfloat16")``).

    python benchmarks/bf16_speed.py                       # SmolLM2-135M, 2 threads, the CPU
    python benchmarks/bf16_speed.py --device cuda          # on a GPU

Prints which bf16 units the device has (``pruner.precision.bf16_units``), then per pass the
median seconds of ``--rounds`` rounds after a warm-up and the ratio to float32 (< 1: faster):

* train step: 4 x 128 tokens, forward + backward + AdamW over every weight (recovery / distillation);
* calibration: 10 x 64 tokens, one forward + backward (the paper's importance pass);
* prefill: 16 x 128 tokens without gradients (evaluation, the teacher, refit statistics);
* generation: 16 sequences x 32 new tokens (the dense model writing its own text).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import pruner
from pruner.precision import bf16_units

MODES = ("float32", "bf16 autocast", "bf16 weights")


def timed(fn: Callable[[], None], rounds: int, device: torch.device) -> float:
    """Median seconds of ``rounds`` calls of ``fn`` after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def passes(model, device: torch.device, vocab: int) -> dict[str, Callable[[], None]]:
    """The four kinds of pass on ``model`` (token ids drawn once, the same for every mode)."""
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, vocab, (4, 128), generator=g).to(device)
    calibration_ids = torch.randint(0, vocab, (10, 64), generator=g).to(device)
    prefill_ids = torch.randint(0, vocab, (16, 128), generator=g).to(device)
    prompt = torch.randint(0, vocab, (16, 8), generator=g).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step() -> None:
        model(input_ids=train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def calibration() -> None:
        model(input_ids=calibration_ids, labels=calibration_ids).loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill() -> None:
        model(input_ids=prefill_ids)

    @torch.no_grad()
    def generation() -> None:
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                       min_new_tokens=32, do_sample=False, pad_token_id=0)

    return {"train step 4 x 128": train_step, "calibration 10 x 64": calibration,
            "prefill 16 x 128": prefill, "generation 16 x 32": generation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="pruner.load_model name or folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cell, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dense, _ = pruner.load_model(args.model, dtype=torch.float32)
    vocab = dense.config.vocab_size
    print(f"device {device}; bf16 units: {bf16_units(device) or 'none (bf16 is emulated)'}; "
          f"{args.threads} threads; {args.model}\n")
    seconds: dict[str, dict[str, float]] = {}
    for mode in MODES:
        model = copy.deepcopy(dense).to(device, torch.bfloat16 if mode == "bf16 weights" else torch.float32).train()
        for name, fn in passes(model, device, vocab).items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16 autocast"):
                seconds.setdefault(name, {})[mode] = timed(fn, args.rounds, device)
            print(f"  {name}, {mode}: {seconds[name][mode]:.2f} s", flush=True)
        del model
    print(f"\n| pass | {' | '.join(MODES)} | autocast / fp32 | bf16 weights / fp32 |")
    print("|---|---|---|---|---|---|")
    for name, row in seconds.items():
        cells = " | ".join(f"{row[m]:.2f} s" for m in MODES)
        print(f"| {name} | {cells} | {row['bf16 autocast'] / row['float32']:.2f}x | "
              f"{row['bf16 weights'] / row['float32']:.2f}x |")


if __name__ == "__main__":
    main()
