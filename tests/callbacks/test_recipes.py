"""The pruning recipes through ``python -m pruner fit``: the callback builds from YAML, prunes
the real SmolLM2-135M, and the export reloads with ``pruner.load_pretrained``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import SUBPROCESS_TIMEOUT, needs_smollm2

REPO = Path(__file__).resolve().parents[2]


def test_recipes_configure_the_callback_like_the_paper():
    llama = yaml.safe_load((REPO / "configs" / "llama_20pct.yaml").read_text())
    (prune,) = [c for c in llama["trainer"]["callbacks"] if c["class_path"].endswith("StructuralPruneCallback")]
    args = prune["init_args"]
    assert (args["criterion"], args["aggregation"], args["mode"], args["pruning_ratio"]) == ("element1", "sum",
                                                                                           "block", 0.25)
    assert args["attention_layers"] == args["mlp_layers"] == [4, 30]
    assert llama["data"]["micro_batch_size"] * llama["trainer"]["accumulate_grad_batches"] == 64
    assert (llama["data"]["calibration_samples"], llama["data"]["calibration_seq_len"]) == (10, 64)
    assert llama["model"]["attach_lora_at_start"] is False
    smol = yaml.safe_load((REPO / "configs" / "smollm2_20pct.yaml").read_text())
    (prune,) = smol["trainer"]["callbacks"]
    args, data = prune["init_args"], smol["data"]
    assert args["target_sparsity"] == 0.2
    # the best pipeline measured within 15 minutes (docs/results.md): MLP channels by OBS + refit, then
    # distillation from the dense model into every weight (no LoRA: at equal time, full fine-tuning won)
    assert (args["prune_attention"], args["global_ranking"], args["reconstruct"], args["mlp_selection"],
            args["attach_lora"]) == (False, False, True, "obs-fisher", False)
    assert smol["model"]["distillation_alpha"] == 1.0
    # offline: no dataset, no network; the refit's text is the recovery text (written once)
    assert data["calibration_source"] == "builtin" and data["val_source"] == "builtin-heldout"
    assert data["reconstruction_source"] == data["recovery_source"] == "generated"
    assert data["cutoff_len"] == data["reconstruction_seq_len"]
    assert data["recovery_max_records"] <= data["reconstruction_samples"]
    recovery_steps = smol["trainer"]["max_steps"] - data["calibration_samples"]
    assert recovery_steps == data["recovery_max_records"] // data["micro_batch_size"]  # one pass, no more


def _differences(a, b, prefix=""):
    """Dotted keys whose values differ between two parsed YAML trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in a.keys() | b.keys() for k in _differences(a.get(key), b.get(key), f"{prefix}{key}.")}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {k for i, (x, y) in enumerate(zip(a, b)) for k in _differences(x, y, f"{prefix}{i}.")}
    return set() if a == b else {prefix.rstrip(".")}


def test_the_30_minute_recipe_is_the_default_with_a_larger_budget():
    default = yaml.safe_load((REPO / "configs" / "smollm2_20pct.yaml").read_text())
    longer = yaml.safe_load((REPO / "configs" / "smollm2_20pct_30min.yaml").read_text())
    # the same pipeline and settings; only the budget and the output folders differ
    assert _differences(default, longer) == {
        "trainer.max_steps", "trainer.logger.init_args.name", "trainer.callbacks.0.init_args.export_dir",
        "data.reconstruction_samples", "data.recovery_max_records"}
    data, base = longer["data"], default["data"]
    assert data["reconstruction_samples"] > base["reconstruction_samples"]
    # the default's generated windows are a prefix of this one's: the text of chunk c depends only on
    # the model, the seed, the window length and the chunk size (pruner.data.generated), all shared
    text_keys = ("seed", "reconstruction_seq_len", "generation_batch_size", "generation_cache",
                 "generation_temperature", "generation_top_p")
    assert [data[k] for k in text_keys] == [base[k] for k in text_keys]
    assert longer["model"]["model"] == default["model"]["model"]
    recovery_steps = longer["trainer"]["max_steps"] - data["calibration_samples"]
    # at least twice the default's distillation, in one pass over more text (two passes over less did worse)
    assert 2 * (default["trainer"]["max_steps"] - base["calibration_samples"]) <= recovery_steps
    assert data["recovery_epochs"] == 1 and data["recovery_max_records"] <= data["reconstruction_samples"]
    assert recovery_steps == data["recovery_max_records"] // data["micro_batch_size"]


def test_recipe_callback_builds_from_yaml():
    # jsonargparse builds the callback from its class_path/init_args exactly as LightningCLI does.
    from jsonargparse import ArgumentParser

    from pruner.callbacks import StructuralPruneCallback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(StructuralPruneCallback, "callback")
    smol = yaml.safe_load((REPO / "configs" / "smollm2_20pct.yaml").read_text())
    cfg = parser.parse_object({"callback": smol["trainer"]["callbacks"][0]})
    callback = parser.instantiate_classes(cfg).callback
    assert isinstance(callback, StructuralPruneCallback)
    assert callback.config.attention_layers == (4, 28) and callback.config.target_sparsity == 0.2
    assert callback.export_dir == "outputs/smollm2_20pct/export"


RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_builds_its_trainer_callback_module_and_datamodule(recipe, tiny_dir, tmp_path, monkeypatch):
    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.cli import build_cli
    from pruner.lightning_modules.data import PruneDataModule

    monkeypatch.chdir(tmp_path)  # the recipes' relative output folders
    path = REPO / "configs" / recipe
    # the recipe as LightningCLI builds it, on this machine: the tiny model instead of a hub/wheel model
    cli = build_cli(["--config", str(path), "--model.model", str(tiny_dir), "--trainer.accelerator", "cpu",
                     "--trainer.devices", "1"], run=False)
    assert isinstance(cli.model, CausalLMModule) and isinstance(cli.datamodule, PruneDataModule)
    raw = yaml.safe_load(path.read_text())
    wanted = [c for c in raw["trainer"].get("callbacks") or [] if c["class_path"].endswith("StructuralPruneCallback")]
    built = [c for c in cli.trainer.callbacks if isinstance(c, StructuralPruneCallback)]
    assert len(built) == len(wanted) <= 1
    for callback, spec in zip(built, wanted):  # every key of the recipe reached the callback
        args = spec["init_args"]
        for key in ("criterion", "aggregation", "mode", "target_sparsity", "pruning_ratio", "reconstruct",
                    "mlp_selection", "attention_selection", "round_to", "uniform", "global_ranking"):
            assert getattr(callback.config, key) == args.get(key, getattr(callback.config, key)), key
        assert callback.attach_lora == args.get("attach_lora", True)
        assert callback.lora.r == args.get("lora_r", 8) and callback.export_dir == args.get("export_dir")
    for key, value in (raw.get("data") or {}).items():
        assert cli.datamodule.hparams[key] == value, key
    assert cli.model.hparams.dtype == raw["model"].get("dtype", "auto")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_recipe_prunes_and_exports_a_loadable_model(tmp_path):
    import torch

    import pruner

    # 2 calibration batches, 8 generated windows of 16 tokens for the refit and the distillation,
    # 2 recovery steps: the whole recipe path in a couple of minutes.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "pruner", "fit", "--config", str(REPO / "configs" / "smollm2_20pct.yaml"),
         "--trainer.max_steps", "4", "--data.calibration_samples", "2", "--data.calibration_seq_len", "32",
         "--data.reconstruction_samples", "8", "--data.reconstruction_seq_len", "16", "--data.cutoff_len", "16",
         "--data.recovery_max_records", "8", "--data.generation_batch_size", "8", "--data.val_max_windows", "2",
         "--data.generation_cache", str(cache), "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "outputs" / "smollm2_20pct" / "export"
    assert f"exported the pruned model to {export}" in proc.stdout + proc.stderr
    plan = pruner.Plan.load(export / "plan.json")
    assert plan.params["removed_fraction"] == pytest.approx(0.2, abs=0.005)
    assert plan.calibration["samples"] == 2 and plan.calibration["reconstruction_tokens"] == 8 * 16
    assert all(lp.heads_kept is None for lp in plan.layers)  # MLP channels only
    # the refit and the distillation read one cached text: a single chunk of 8 windows was written
    assert len(list(cache.rglob("chunk*.json"))) == 1
    # evaluated offline on held-out builtin prose: dense, pruned and recovered perplexities
    report = (export / "report.md").read_text()
    ppl = {}
    for row in ("dense (before pruning)", "pruned, before recovery", "after recovery"):
        (line,) = [ln for ln in report.splitlines() if ln.startswith(f"| {row}")]
        ppl[row] = float(line.split("|")[2])
        assert ppl[row] > 1.0
    assert ppl["after recovery"] != ppl["pruned, before recovery"]  # the two recovery steps moved the weights
    assert "Validation windows: protocol 'paper'" in report  # SmolLM2's tokenizer adds no BOS
    untouched = [lp for lp in plan.layers if lp.index < 4 or lp.index >= 28]
    assert all(lp.heads_kept is None and lp.mlp_channels_kept is None for lp in untouched)
    model = pruner.load_pretrained(export)
    assert pruner.count_parameters(model) == plan.params["after"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


@pytest.mark.slow
@needs_smollm2
def test_oneshot_recipe_refits_on_generated_text_without_training(tmp_path):
    import torch

    import pruner

    recipe = yaml.safe_load((REPO / "configs" / "smollm2_oneshot.yaml").read_text())
    args = recipe["trainer"]["callbacks"][0]["init_args"]
    assert (args["prune_attention"], args["reconstruct"], args["mlp_selection"], args["attach_lora"],
            args["regional_epochs"]) == (False, True, "obs-fisher", False, 4)
    assert recipe["data"]["reconstruction_source"] == "generated" and recipe["data"]["recovery_source"] is None
    # a short version: 2 calibration windows, 8 generated windows of 16 tokens for the refit
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "pruner", "fit", "--config", str(REPO / "configs" / "smollm2_oneshot.yaml"),
         "--trainer.max_steps", "2", "--data.calibration_samples", "2", "--data.calibration_seq_len", "32",
         "--data.reconstruction_samples", "8", "--data.reconstruction_seq_len", "16", "--data.val_max_windows", "2",
         "--data.generation_cache", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "outputs" / "smollm2_oneshot" / "export"
    plan = pruner.Plan.load(export / "plan.json")
    assert plan.calibration["reconstruction_tokens"] == 8 * 16
    assert plan.params["removed_fraction"] == pytest.approx(0.2, abs=0.005)
    kept = {len(lp.mlp_channels_kept) for lp in plan.layers if lp.mlp_channels_kept is not None}
    assert len(kept) == 1 and all(lp.heads_kept is None for lp in plan.layers)  # same count, every head kept
    assert len([lp for lp in plan.layers if lp.mlp_channels_kept is not None]) == 24  # layers 4..27
    exported = pruner.load_pretrained(export).state_dict()
    dense, _ = pruner.load_model("smollm2")
    pruner.apply_plan(plan, dense)
    plain = dense.state_dict()  # the refit and the regional fit changed the pruned MLPs; nothing else moved
    changed = {k for k in plain if not torch.equal(plain[k], exported[k])}
    assert changed and all(k.split(".")[2] in {str(i) for i in range(4, 28)} and ".mlp." in k for k in changed), \
        sorted(changed)[:5]
    assert any(k.endswith("up_proj.weight") for k in changed)  # the regional fit trains gate and up too
    fit = plan.calibration["regional"]
    assert fit["layers"] == list(range(4, 28)) and sum(fit["error_after"]) < sum(fit["error_before"])
