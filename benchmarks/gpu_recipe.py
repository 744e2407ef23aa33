"""The paper's recipe (`configs/llama_20pct.yaml`) end to end on one GPU, offline, on a model of
LLaMA-7B's shape with random weights: what each stage takes and what the export gains.

    python benchmarks/gpu_recipe.py --shape 7b --output gpu_recipe/     # one GPU (the recipe asks >= 48 GB)
    python benchmarks/gpu_recipe.py --shape tiny --output /tmp/dry/     # the same path on a CPU, a tiny model

Not yet run on a GPU: it was written for the first session lent one (2026-12-04's was refused at
the call). The tiny shape ran end to end on 2 CPU cores (fit, evaluate, tables).

Random weights say nothing about quality; they do exercise every step the recipe takes with a
real checkpoint (bf16 weights on the GPU, bf16-mixed precision, the paper's block-wise element1
pruning of layers 4-29 at ratio 0.25, LoRA on all seven projections with gradient accumulation
16, a checkpoint, the merged export) at the real sizes, so the wall times, the GPU memory and the
dense-vs-pruned speed are those a user of the recipe meets. What this run replaces, from the
recipe: the hub checkpoint (a random model of its shape written to disk first), BookCorpus (the
builtin calibration text), Alpaca-cleaned (an Alpaca-format JSON of builtin text, ``--records``
records: one pass), WikiText-2 (builtin-heldout for the callback's perplexities).

Stages are timed by when the fit prints its lines (pruned, recovered perplexity,
exported); the GPU memory column is the most ``nvidia-smi`` showed in use while the fit ran
(sampled every 100 ms: it includes PyTorch's cached blocks). Then ``python -m pruner evaluate``
compares the dense folder with the export (parameters, MACs per token, prefill and generation
tokens/s, peak memory) in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # LLaMA-7B (MHA, the paper's model) and a tiny one of the same family for dry runs
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=32, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=512),
}
# the fit's lines that end a stage (regular expressions on its output), in order
STAGES = [
    ("load + calibration + prune", r"StructuralPruneCallback: pruned at batch"),
    ("recovery (LoRA)", r"validation perplexity \(recovered\)"),
    ("merge + export", r"exported the pruned model"),
]


def write_model(folder: Path, shape: str, device: str) -> float:
    """A random LLaMA of ``shape`` in bf16 with an offline byte-level tokenizer; seconds taken."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruner.testing import save_tiny_llama

    start = time.perf_counter()
    save_tiny_llama(folder, vocab_size=512)  # the tokenizer (and a tiny model, replaced below)
    tiny = LlamaConfig.from_pretrained(folder)
    # a new config, not the tiny one with its sizes overwritten: head_dim is derived when it is built
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-5,
                         pad_token_id=tiny.pad_token_id, bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder)
    del model
    return time.perf_counter() - start


def write_alpaca(path: Path, records: int) -> None:
    """Alpaca-format records cut from the builtin text (instruction: a sentence; output: the next)."""
    from pruner.data import builtin_text

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", builtin_text()) if len(s.strip()) > 40]
    rows = [{"instruction": sentences[i], "input": "", "output": " ".join(sentences[i + 1:i + 4])}
            for i in range(min(records, len(sentences) - 4))]
    path.write_text(json.dumps(rows))


class GpuMemorySampler:
    """The most memory ``nvidia-smi`` shows in use on GPU 0 while running (MiB; None without it)."""

    def __init__(self) -> None:
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak_mib = max(self.peak_mib or 0, int(out))
            self._stop.wait(0.1)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_fit(work: Path, model: Path, alpaca: Path, log: Path, accelerator: str) -> dict:
    """The recipe with the offline replacements; stage times from its output lines, peak GPU memory."""
    args = [
        sys.executable, "-m", "pruner", "fit", "--config", str(REPO / "configs" / "llama_20pct.yaml"),
        "--model.model", str(model), "--data.calibration_source", "builtin",
        "--data.recovery_source", str(alpaca), "--data.val_source", "builtin-heldout",
        "--trainer.val_check_interval", "1.0",  # the recipe's 3200 is more batches than this pass has
        "--trainer.accelerator", accelerator,
    ]
    if accelerator == "cpu":
        args += ["--trainer.precision", "32-true", "--model.dtype", "float32"]
    marks, lines = [], []
    start = time.perf_counter()
    with GpuMemorySampler() as memory, log.open("w", buffering=1) as sink:
        proc = subprocess.Popen(args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            sink.write(line)
            lines.append(line)
            if len(marks) < len(STAGES) and re.search(STAGES[len(marks)][1], line):
                marks.append(time.perf_counter() - start)
        rc = proc.wait()
    total = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"the fit failed (exit {rc}); its log: {log}\n" + "".join(lines[-30:]))
    stages, before = {}, 0.0
    for (name, _), at in zip(STAGES, marks):
        stages[name] = round(at - before, 1)
        before = at
    stages["total (process)"] = round(total, 1)
    perplexities = {m[0]: float(m[1]) for m in re.findall(r"validation perplexity \(([^)]+)\): ([0-9.]+)", "".join(lines))}
    return {"stages_s": stages, "peak_gpu_mib": memory.peak_mib, "perplexity_builtin_heldout": perplexities}


def run_evaluate(work: Path, model: Path, export: Path, out: Path, dtype: str) -> dict:
    args = [sys.executable, "-m", "pruner", "evaluate", "--model", str(model), "--compare", str(export),
            "--dtype", dtype, "--new-tokens", "16", "--output", str(out)]
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True)
    (out.parent / "evaluate.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout)
    return json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--records", type=int, default=256, help="Alpaca-format records (one pass; 256 = 4 optimizer steps)")
    p.add_argument("--work", default=None, help="scratch folder for the model, checkpoint and export (default: a temp folder)")
    p.add_argument("--output", required=True, help="folder for the fit log, the evaluation report and results.json")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_recipe_{os.getpid()}"
    if work.exists():
        raise SystemExit(f"--work {work} exists: give a new folder (the recipe refuses to overwrite its export)")
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    device, accelerator = ("cuda", "gpu") if cuda else ("cpu", "cpu")
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(0) if cuda else platform.processor(),
              "torch": torch.__version__, "records": args.records}
    result["write_model_s"] = round(write_model(work / "model", args.shape, device), 1)
    write_alpaca(work / "alpaca.json", args.records)
    result["fit"] = run_fit(work, work / "model", work / "alpaca.json", out / "fit.log", accelerator)
    print(json.dumps(result["fit"], indent=1))
    export = work / "outputs" / "llama7b_20pct" / "export"
    result["evaluate"] = run_evaluate(work, work / "model", export, out / "eval", "bfloat16" if cuda else "float32")
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(work)  # ~40 GB at the 7b shape
    return 0


if __name__ == "__main__":
    sys.exit(main())
