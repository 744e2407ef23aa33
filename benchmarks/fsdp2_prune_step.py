"""FSDP2's prune step and export on 2 CPU processes (gloo): per-rank peak memory of each phase,
with the ranks slicing their own shards (the default for the paper's pipeline) and with every
rank gathering an unsharded copy (what the step did before; still what ``reconstruct=True`` needs).

    python benchmarks/fsdp2_prune_step.py --shape llama-3.2-1b --dtype float32
    python benchmarks/fsdp2_prune_step.py --shape llama-3.2-1b --dtype bfloat16 --teacher
    python benchmarks/fsdp2_prune_step.py --shape llama-3.2-1b --dtype float32 --reconstruct

``--teacher``: the module distils (``distillation_alpha=0.5``); *sliced* keeps the dense model's
own shards as teacher, *gathered* a whole dense copy on every rank (what a teacher cost before).
``--reconstruct``: the best pipeline's prune step instead (MLP channels of layers 4..L-2 chosen by
OBS, least-squares refit and one epoch of the regional fit on 16 windows of 128 builtin tokens);
*sliced* walks a copy gathered one decoder layer at a time, *gathered* an unsharded copy.

A random LlamaForCausalLM at ``--shape`` (benchmarks/pipeline_at_scale.py's shapes) is written to
a temporary folder; ``CausalLMModule`` + ``PruneDataModule`` + ``StructuralPruneCallback`` (the
paper's pipeline: element1, block-wise, ratio 0.25 in layers 4..L-2, LoRA on all seven
projections) run a Lightning fit under ``ModelParallelStrategy(data_parallel_size=2)`` that ends
one step after the prune step, each mode in fresh processes. Peak memory is each rank's resident
set above its level when the phase starts, sampled every 2 ms with freed blocks returned to the
system at once (``MALLOC_MMAP_THRESHOLD_=65536``), as a multiple of the dense weights' bytes.
Phases: *start* (discovery: the callback's copy of what it probes), *prune step* (selection,
surgery, LoRA, re-sharding) and *export* (LoRA merged and the model written by rank 0, gathered
one decoder layer at a time, in both modes); *held* is what the prune step leaves resident (the
pruned shards replace the calibration's gradient shards; a teacher copy stays), *recovery step*
the largest peak of one training step after it. Prints one table row per mode and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _child import FIXED_MMAP  # benchmarks/ is on sys.path when a script here runs
from pipeline_at_scale import build


def write_model(shape: str, dtype: str, folder: Path) -> int:
    """The random model and a tokenizer-free folder's config; returns the dense weights' bytes."""
    model = build(shape, dtype)
    model.save_pretrained(folder)
    from pruner.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(folder: str, out: str, mode: str, dtype: str, teacher: bool, reconstruct: bool) -> None:
    """One fit on 2 processes; each rank writes ``out/<mode>-rank<r>.json``."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pruner.callbacks import StructuralPruneCallback
    from pruner.eval.efficiency import peak_memory

    def resident() -> int:
        import psutil

        return psutil.Process().memory_info().rss
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    if mode == "gathered":
        import pruner.callbacks.pruning as pruning

        StructuralPruneCallback._slices_shards = lambda self, *args: False
        pruning.teacher_in_place = lambda *args: False  # a teacher is a whole dense copy, as before
    phases: dict[str, float] = {}

    def measured(method: str, key: str) -> None:
        original = getattr(StructuralPruneCallback, method)

        def run(self, *args):
            t, before = time.perf_counter(), resident()
            result, peak = peak_memory(lambda: original(self, *args))
            phases[f"{key}_peak_bytes"] = max(peak, phases.get(f"{key}_peak_bytes", 0))
            phases[f"{key}_held_bytes"] = resident() - before
            phases[f"{key}_s"] = time.perf_counter() - t
            return result

        setattr(StructuralPruneCallback, method, run)

    measured("_prepare", "start")
    measured("_prune", "prune")
    measured("_finish", "export")
    step = CausalLMModule.training_step

    def recovery_step(self, batch, batch_idx):  # the steps after the prune step (the teacher runs in them)
        if not prune._pruned:
            return step(self, batch, batch_idx)
        loss, peak = peak_memory(lambda: step(self, batch, batch_idx))
        phases["recovery_peak_bytes"] = max(peak, phases.get("recovery_peak_bytes", 0))
        return loss

    CausalLMModule.training_step = recovery_step
    records = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 2)))} for i in range(32)]
    alpaca = Path(out) / "alpaca.json"
    alpaca.write_text(json.dumps(records))
    layers = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    module = CausalLMModule(folder, learning_rate=1e-4, dtype=dtype, distillation_alpha=0.5 if teacher else 0.0)
    text = dict(reconstruction_source="builtin", reconstruction_samples=16, reconstruction_seq_len=128) \
        if reconstruct else {}
    data = PruneDataModule(calibration_source="builtin", calibration_samples=4, calibration_seq_len=64,
                           recovery_source=str(alpaca), micro_batch_size=1, val_source=None, **text)
    pipeline = dict(prune_attention=False, reconstruct=True, reconstruct_damping=0.01, mlp_selection="obs",
                    regional_epochs=1) if reconstruct else dict(attention_layers=(4, layers - 1),
                                                                 head_granularity="query")
    prune = StructuralPruneCallback(criterion="element1", pruning_ratio=0.25, mlp_layers=(4, layers - 1),
                                    global_ranking=False, report_perplexity=False, verbose=False,
                                    export_dir=str(Path(out) / mode), **pipeline)
    trainer = L.Trainer(max_steps=3, max_epochs=1, accelerator="cpu", devices=2,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[prune],
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    trainer.fit(module, data)
    row = {"rank": trainer.global_rank, "mode": mode, "removed_fraction": prune.plan.params["removed_fraction"],
           "threads": torch.get_num_threads(), "teacher_sharded": module.teacher is not None and
           all(hasattr(p, "full_tensor") for p in module.teacher.parameters()), **phases}
    (Path(out) / f"{mode}-rank{trainer.global_rank}.json").write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--teacher", action="store_true", help="the module distils from the dense model")
    p.add_argument("--reconstruct", action="store_true", help="the best pipeline's prune step (OBS, refit, regional)")
    p.add_argument("--modes", default="sliced,gathered", help="which rows to run (default: sliced,gathered)")
    p.add_argument("--child", nargs=3, metavar=("FOLDER", "OUT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.modes or set(args.modes.split(",")) - {"sliced", "gathered"}:
        p.error(f"--modes {args.modes!r}: a comma-separated choice of sliced, gathered")
    if args.child:
        child(*args.child, args.dtype, args.teacher, args.reconstruct)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "out"
        out.mkdir()
        weights = write_model(args.shape, args.dtype, folder)
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), str(out), mode,
                                   "--dtype", args.dtype, *(["--teacher"] if args.teacher else []),
                                   *(["--reconstruct"] if args.reconstruct else [])],
                                  capture_output=True, text=True, timeout=3 * 3600, env={**os.environ, **FIXED_MMAP})
            if proc.returncode != 0:
                print(f"{mode} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            ranks = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
            rows.append({"mode": mode, "weights_bytes": weights, "ranks": ranks})
    print(f"{platform.machine()} CPU, 2 processes (gloo), {rows[0]['ranks'][0]['threads']} thread(s) each, "
          f"{time.strftime('%Y-%m-%d')}; {args.shape} in {args.dtype}: {weights / 2**30:.2f} GiB of weights"
          f"{'; distilling from the dense model' if args.teacher else ''}"
          f"{'; best pipeline (OBS, refit, regional fit)' if args.reconstruct else ''}")
    print("| prune step | start: peak extra GiB per rank (/ weights) | prune step: peak extra GiB per rank (/ weights) "
          "| held after it | prune step s | recovery step: peak | export: peak extra GiB per rank (/ weights) "
          "| teacher sharded | removed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cell = lambda key: " / ".join(f"{r[key] / 2**30:.2f} ({r[key] / weights:.2f}x)" for r in row["ranks"])  # noqa: E731
        print(f"| {row['mode']} | {cell('start_peak_bytes')} | {cell('prune_peak_bytes')} | {cell('prune_held_bytes')} | "
              f"{max(r['prune_s'] for r in row['ranks']):.1f} | {cell('recovery_peak_bytes')} | "
              f"{cell('export_peak_bytes')} | {'yes' if row['ranks'][0]['teacher_sharded'] else '-'} | "
              f"{row['ranks'][0]['removed_fraction']:.1%} |")
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
