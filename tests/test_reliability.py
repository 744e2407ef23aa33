"""Reliability: the bad-input matrix (every case fails early with a message naming the problem
and the fix, and leaves no files behind), kill during export, determinism of the plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import pruner
from pruner.data import calibration_samples
from pruner.errors import PlanMismatchError, PrunerError, UnsupportedArchitectureError
from pruner.testing import tiny_causal_lm


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (1, 12), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from pruner.lightning_modules.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@dataclass
class Ctx:
    tmp: Path
    tiny_dir: Path
    model: torch.nn.Module  # a tiny Llama whose weights must not change

    def tokenizer(self):
        from pruner.data import load_tokenizer

        return load_tokenizer(str(self.tiny_dir))


@dataclass
class Case:
    id: str
    run: Callable[[Ctx], object]
    error: type[BaseException]
    problem: str  # regex: what is wrong
    fix: str  # regex: what to do about it


def _prune(**kw):
    return lambda c: pruner.prune(c.model, _batches(), **kw)


def _exported(c: Ctx) -> Path:
    folder = c.tmp / "exported"
    pruner.save_pretrained(tiny_causal_lm("llama"), folder)
    return folder


def _missing_weights(c: Ctx):
    folder = _exported(c)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return pruner.load_pretrained(folder)


def _corrupt_weights(c: Ctx):
    folder = _exported(c)
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    return pruner.load_pretrained(folder)


def _existing_output(c: Ctx):
    folder = c.tmp / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    return pruner.save_pretrained(c.model, folder)


def _foreign_plan(c: Ctx):
    other = tiny_causal_lm("llama", num_hidden_layers=4)
    plan = pruner.prune(other, _batches(), pruning_ratio=0.5)
    path = c.tmp / "plan.json"
    plan.save(path)
    return pruner.apply_plan(pruner.Plan.load(path), c.model)


def _write(c: Ctx, name: str, text: str) -> str:
    path = c.tmp / name
    path.write_text(text)
    return str(path)


def _alpaca(c: Ctx, text: str):
    from pruner.data import alpaca_records

    return alpaca_records(_write(c, "alpaca.json", text))


def _per_sample(c: Ctx):
    from pruner.discovery import discover
    from pruner.importance import ImportanceEstimator

    fams = [discover(c.model).layers[0].mlp.channels]
    ImportanceEstimator(c.model, fams, "element2").begin_batch(4)


def _nan_gradients(c: Ctx):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return pruner.prune(model, _batches(), pruning_ratio=0.5)


def _gpt2(c: Ctx):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=1, eos_token_id=2)
    return pruner.prune(tf.GPT2LMHeadModel(cfg), _batches(), pruning_ratio=0.5)


def _base_model(c: Ctx):
    import transformers as tf

    return pruner.prune(tf.LlamaModel(c.model.config), _batches(), pruning_ratio=0.5)


def _lora_target(c: Ctx):
    import lightning as L

    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    module = CausalLMModule(str(c.tiny_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=c.tmp,
                        callbacks=[StructuralPruneCallback(pruning_ratio=0.5, lora_target_modules=["q_proj", "c_attn"],
                                                           verbose=False)])
    trainer.fit(module, PruneDataModule(calibration_samples=2, calibration_seq_len=16))


def _ranks_disagree(c: Ctx):
    from types import SimpleNamespace

    from pruner.callbacks.distributed import check_ranks_agree

    plan = pruner.prune(tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5)
    # rank 1's view: rank 0 broadcast another digest; the reduce counts one disagreeing rank
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: "digest-of-rank-0",
                               reduce=lambda t, reduce_op="sum": t)
    check_ranks_agree(SimpleNamespace(strategy=strategy, world_size=2), plan)


def _cli_unknown_key(c: Ctx):
    proc = subprocess.run([sys.executable, "-m", "pruner", "fit", "--config", _write(c, "bad.yaml", "trainer:\n  max_stepz: 3\n")],
                          capture_output=True, text=True, timeout=120, cwd=c.tmp)
    raise PrunerError(f"exit {proc.returncode}: {proc.stderr.strip()}")


def _cli_missing_config(c: Ctx):
    proc = subprocess.run([sys.executable, "-m", "pruner", "fit", "--config", str(c.tmp / "nope.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=c.tmp)
    raise PrunerError(f"exit {proc.returncode}: {proc.stderr.strip()}")


CASES = [
    Case("ratio-negative", _prune(pruning_ratio=-0.1), PrunerError, "pruning_ratio must be strictly between 0 and 1",
         "such as 0.2"),
    Case("ratio-one", _prune(pruning_ratio=1.0), PrunerError, "strictly between 0 and 1, got 1.0", "such as 0.2"),
    Case("target-beyond-ranges", _prune(target_sparsity=0.9, attention_layers=(0, 1), mlp_layers=(0, 1)),
         PrunerError, "asks to remove .* allow at most", "widen attention_layers/mlp_layers, or lower the target"),
    Case("range-outside-model", _prune(pruning_ratio=0.2, attention_layers=(2, 9)), PrunerError,
         r"attention_layers=\(2, 9\) reaches past the model's 3 layers", "use an end <= 3"),
    Case("range-empty", _prune(pruning_ratio=0.2, mlp_layers=(2, 2)), PrunerError, r"mlp_layers=\(2, 2\) is empty",
         r"use \(start, end\) with 0 <= start < end"),
    Case("unknown-criterion", _prune(pruning_ratio=0.2, criterion="taylor"), PrunerError,
         "unknown criterion 'taylor'", "element1"),
    Case("unknown-aggregation", _prune(pruning_ratio=0.2, aggregation="median"), PrunerError,
         "unknown aggregation 'median'", "sum"),
    Case("unknown-mode", _prune(pruning_ratio=0.2, mode="width"), PrunerError, "unknown mode 'width'", "block"),
    Case("gqa-whole-groups", _prune(pruning_ratio=0.25, head_granularity="kv"), PrunerError,
         "cannot be met by removing whole key/value groups: layer 0 has 2 KV groups",
         "head_granularity='query' .* or pruning_ratio=0.5"),
    Case("no-calibration", lambda c: pruner.prune(c.model, [], pruning_ratio=0.2), PrunerError,
         "no calibration batches", r"data-free criterion \(l1, l2, random\)"),
    Case("calibration-too-short",
         lambda c: calibration_samples(["A short text."], c.tokenizer(), 4, 64), PrunerError,
         "no document of at least seq_len=64 tokens", "use a longer text or a smaller seq_len"),
    Case("second-order-per-sample", _per_sample, PrunerError, "'element2' needs per-sample gradients",
         "use calibration batches of one sample"),
    Case("nan-gradients", _nan_gradients, PrunerError, "NaN/inf", "check the data and the model's dtype"),
    Case("conv1d-architecture", _gpt2, UnsupportedArchitectureError, "c_attn: Conv1D projections are not supported",
         "nn.Linear"),
    Case("not-a-causal-lm", _base_model, UnsupportedArchitectureError, "LlamaModel has no output",
         "load it with AutoModelForCausalLM"),
    Case("missing-data-file", lambda c: calibration_samples(str(c.tmp / "none.txt"), c.tokenizer()),
         FileNotFoundError, "calibration text not found: .*none.txt", "pass an existing .txt file or folder"),
    Case("malformed-json", lambda c: _alpaca(c, "[{not json"), PrunerError, "is not valid JSON",
         "expected a list of records"),
    Case("alpaca-missing-field", lambda c: _alpaca(c, json.dumps([{"instruction": "Say hi."}])), PrunerError,
         "'output'", "instruction"),
    Case("output-folder-exists", _existing_output, PrunerError, "already exists and is not empty",
         "choose another folder or pass overwrite=True"),
    Case("missing-safetensors", _missing_weights, FileNotFoundError, "no .safetensors weights",
         "the export is incomplete"),
    Case("corrupt-safetensors", _corrupt_weights, PrunerError, "is not a valid safetensors file", "re-export"),
    Case("plan-for-another-model", _foreign_plan, PlanMismatchError, "the plan has 4 layers but the model has 3",
         "apply a plan to the dense model it was made for"),
    Case("lora-target-missing", _lora_target, PrunerError, r"LoRA target\(s\) \['c_attn'\] match no linear layer",
         "set lora_target_modules"),
    Case("ranks-disagree", _ranks_disagree, PrunerError, "ranks disagree on the pruning plan",
         "check that every rank loads the same weights"),
    Case("cli-unknown-key", _cli_unknown_key, PrunerError, "exit [12]: .*max_stepz", ""),
    Case("cli-missing-config", _cli_missing_config, PrunerError, "exit [12]: .*nope.yaml", ""),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_with_problem_and_fix_and_leaves_no_files(case, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_causal_lm("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = Ctx(tmp_path, tiny_dir, model)
    with pytest.raises(case.error) as info:
        case.run(ctx)
    message = str(info.value)
    assert info.match(case.problem), message
    assert info.match(case.fix), message
    assert "Traceback" not in message  # CLI cases: one line, no traceback
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "the model changed"
    # nothing written besides what the case itself prepared (inputs, the pre-existing export)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name in ("lightning_logs", "checkpoints")]
    assert leftovers == [], leftovers


def test_matrix_has_at_least_twenty_distinct_faults():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


def test_existing_output_folder_is_left_untouched(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    snap = _snapshot(tmp_path)
    with pytest.raises(PrunerError):
        pruner.save_pretrained(tiny_causal_lm("llama"), folder)
    assert _snapshot(tmp_path) == snap


# ----------------------------------------------------------------------------- kill during export

KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import pruner
    from pruner.plan import Plan
    from pruner.testing import tiny_causal_lm

    folder, marker, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    model = tiny_causal_lm("llama", seed=seed)
    plan = pruner.prune(model, [], pruning_ratio=0.5, criterion="l2")
    def stall(self, path):  # the plan is the last file written: stall there until killed
        marker.write_text("writing")
        time.sleep(600)
    Plan.save = stall
    pruner.save_pretrained(model, folder, plan=plan, overwrite=True)
''')


def _kill_during_export(tmp_path: Path, folder: Path, seed: int) -> None:
    script, marker = tmp_path / "kill.py", tmp_path / f"marker{seed}"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(marker), str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the export never reached its last file"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()


@pytest.mark.slow
def test_kill_during_export_leaves_the_old_folder_or_nothing(tmp_path):
    new_folder = tmp_path / "fresh"
    _kill_during_export(tmp_path, new_folder, seed=1)
    assert not new_folder.exists()  # a first export killed midway leaves no folder at all

    folder = tmp_path / "model"
    old = tiny_causal_lm("llama", seed=2)
    pruner.save_pretrained(old, folder)
    snap = _snapshot(folder)
    _kill_during_export(tmp_path, folder, seed=3)
    assert _snapshot(folder) == snap  # the previous export, whole
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), old.state_dict())
    stale = sorted(p.name for p in tmp_path.glob(".model.tmp-*"))
    assert len(stale) == 1  # the killed writer's temporary folder ...
    new = tiny_causal_lm("llama", seed=4)
    pruner.save_pretrained(new, folder, overwrite=True)
    assert not list(tmp_path.glob(".model.tmp-*"))  # ... is removed by the next export
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), new.state_dict())


# ----------------------------------------------------------------------------- determinism


def test_plan_records_what_reapplying_needs_and_is_bit_identical_across_runs(tmp_path):
    plans = []
    for run in range(2):
        model = tiny_causal_lm("llama")
        plan = pruner.prune(model, _batches(3), target_sparsity=0.2, global_ranking=True)
        plan.save(tmp_path / f"plan{run}.json")
        plans.append((tmp_path / f"plan{run}.json").read_bytes())
    assert plans[0] == plans[1]
    data = json.loads(plans[0])
    assert data["pruner_version"] and data["model"]["fingerprint"] and data["settings"]["target_sparsity"] == 0.2
    reapplied = tiny_causal_lm("llama")
    pruner.apply_plan(pruner.Plan.load(tmp_path / "plan0.json"), reapplied)
    assert pruner.count_parameters(reapplied) == data["params"]["after"]
