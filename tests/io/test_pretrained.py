"""Saving and loading pruned models: safetensors, per-layer widths, plain configs, safety."""

import json
import subprocess
import sys

import pytest
import torch

import pruner
import pruner.io
from pruner.checks import check_device
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT, have_shared_data, needs_smollm2


def _pruned(arch="llama", **kw):
    model = tiny_causal_lm(arch, num_hidden_layers=4, intermediate_size=128)
    batches = [torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = pruner.prune(model, batches, **(kw or dict(target_sparsity=0.3, global_ranking=True)))
    return model, plan


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm", "phi3"])
def test_non_uniform_widths_roundtrip_with_our_loader(tmp_path, arch):
    model, plan = _pruned(arch)
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    config = json.loads((folder / "config.json").read_text())
    assert "pruner_shapes" in config and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.")
    assert (folder / "modeling_pruned.py").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickle
    saved_plan = pruner.Plan.load(folder / "plan.json")
    assert saved_plan.params == plan.params
    assert saved_plan.settings["modeling_file_sha256"] == config["pruner_modeling_sha256"]
    loaded = pruner.load_pretrained(folder)
    ids = torch.randint(3, 128, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert pruner.count_parameters(loaded) == plan.params["after"]


def test_uniform_widths_export_a_plain_config(tmp_path):
    model, plan = _pruned(pruning_ratio=0.5)  # same ratio in every layer
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    config = json.loads((folder / "config.json").read_text())
    assert "pruner_shapes" not in config and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 2, 64)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder)  # no remote code at all
    ids = torch.randint(3, 128, (1, 7))
    torch.testing.assert_close(plain(ids).logits, model(ids).logits)


def test_fresh_process_loads_with_trust_remote_code_and_generates(tmp_path):
    model, plan = _pruned("phi3")
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    ids = [[5, 9, 17, 33]]
    expected = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0].tolist()
    code = (
        "import sys, torch, transformers\n"
        "sys.modules.pop('pruner', None)\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert 'pruner' not in sys.modules, 'the exported folder must not need the package'\n"
        f"print(m.generate(torch.tensor({ids}), max_new_tokens=6, do_sample=False)[0].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)


def test_existing_folder_is_refused_and_left_untouched(tmp_path):
    model, plan = _pruned()
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(pruner.PrunerError, match="overwrite=True"):
        pruner.save_pretrained(model, target, plan=plan)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    # overwrite=True replaces only an earlier export: this folder holds the user's own file
    with pytest.raises(pruner.PrunerError, match="not an export written by pruner.*move its contents away"):
        pruner.save_pretrained(model, target, plan=plan, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    export = tmp_path / "export"
    pruner.save_pretrained(model, export, plan=plan)
    (export / "stale.txt").write_text("from the earlier export run")
    pruner.save_pretrained(model, export, plan=plan, overwrite=True)
    assert (export / "model.safetensors").is_file() and not (export / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]  # no temporary folders left behind


def test_failed_export_leaves_nothing_behind(tmp_path):
    model, plan = _pruned()

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(model, tmp_path / "out", tokenizer=BrokenTokenizer(), plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        pruner.load_pretrained(tmp_path / "nowhere")
    model, plan = _pruned()
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(pruner.PrunerError, match="not a valid safetensors file"):
        pruner.load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        pruner.load_pretrained(folder)
    (folder / "plan.json").write_text('{"format": "pruner-plan/1", "layers": [')
    with pytest.raises(pruner.PrunerError, match="not valid JSON"):
        pruner.Plan.load(folder / "plan.json")


def test_plan_for_another_model_is_refused():
    _, plan = _pruned()
    other = tiny_causal_lm("llama", num_hidden_layers=3)
    with pytest.raises(pruner.PlanMismatchError, match="plan has 4 layers but the model has 3"):
        pruner.apply_plan(plan, other)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_prune_export_reload(tmp_path):
    """The real model: 20% of parameters removed block-wise in layers 4-28, exported and reloaded
    in a fresh process with plain transformers, and it still writes English."""
    from pruner.data import calibration_samples

    model, tok = pruner.load_model("smollm2")
    source = "builtin"
    if have_shared_data():
        from tests.helpers import SHARED_DATA

        source = str(SHARED_DATA / "gutenberg")
    batches = calibration_samples(source, tok, num_samples=10, seq_len=64, seed=0)
    plan = pruner.prune(model, [batches[i:i + 1] for i in range(10)], target_sparsity=0.2,
                        attention_layers=(4, 28), mlp_layers=(4, 28), global_ranking=True, head_granularity="kv")
    assert abs(plan.params["removed_fraction"] - 0.2) < 0.002
    assert plan.params["before"] == 134_515_008
    folder = pruner.save_pretrained(model, tmp_path / "smollm2-pruned", tokenizer=tok, plan=plan)
    code = (
        "import torch, transformers\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "ids = tok('The capital of France is', return_tensors='pt').input_ids\n"
        "print(repr(tok.decode(m.generate(ids, max_new_tokens=8, do_sample=False)[0])))\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    text, count = out.stdout.strip().splitlines()[-2:]
    assert int(count) == plan.params["after"]
    assert text.startswith("'The capital of France is") and len(text) > 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_gpu_that_torch_cannot_see_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama")
    pruner.save_pretrained(model, tmp_path / "export")
    read = []
    monkeypatch.setattr(pruner.io.pretrained, "_check_folder", lambda folder: read.append(folder))
    with pytest.raises(PrunerError, match="sees no GPU; use 'cpu'"):
        pruner.load_pretrained(tmp_path / "export", device="cuda")
    assert read == []  # refused before the folder was read


def test_check_device_names_the_gpus_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("device", "cuda:1") == torch.device("cuda:1")
    assert check_device("--device", "auto", allow_auto=True) == torch.device("cuda")
    with pytest.raises(PrunerError, match=r"--device 'cuda:2': torch sees 2 GPU\(s\), cuda:0 to cuda:1"):
        check_device("--device", "cuda:2")
    with pytest.raises(PrunerError, match="'auto' is not a device"):
        check_device("device", "auto")  # only where the caller allows it
