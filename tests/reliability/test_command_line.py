"""The command line and recipes: every failure is one line naming the problem and the fix, and
the exit status says what happened (2 a bad command line or config, before anything runs; 1 a
failure while running; 143 SIGTERM; 130 Ctrl-C); --debug shows the traceback instead."""

from __future__ import annotations

import signal

import pytest
import yaml

from tests.helpers import REPO, assert_one_line_error
from tests.helpers import run_pruner as run


def _recipe(tmp_path, tiny_dir, **trainer) -> dict:
    return {
        "trainer": {"accelerator": "cpu", "max_steps": 6, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "root"),
                    "callbacks": [{"class_path": "pruner.callbacks.StructuralPruneCallback",
                                   "init_args": {"pruning_ratio": 0.5, "calibration_batches": 2, "verbose": False,
                                                 "export_dir": str(tmp_path / "export")}}], **trainer},
        "model": {"model": str(tiny_dir)},
        "data": {"calibration_samples": 2, "calibration_seq_len": 16, "recovery_source": "builtin",
                 "recovery_max_records": 8, "micro_batch_size": 2, "cutoff_len": 16},
    }


def _write(tmp_path, config: dict, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 143, "stopped by SIGTERM at step"),
                                                  (signal.SIGINT, 130, "interrupted (Ctrl-C) at step")])
def test_a_fit_stopped_in_recovery_exits_non_zero_and_says_nothing_was_exported(tiny_dir, tmp_path, signum, status,
                                                                                said):
    config = _recipe(tmp_path, tiny_dir)
    config["trainer"]["callbacks"].append({"class_path": "tests.helpers.SignalAt",
                                           "init_args": {"step": 4, "signum": int(signum)}})
    proc = run("fit", "--config", str(_write(tmp_path, config)))
    assert proc.returncode == status, proc.stderr[-2000:]
    assert_one_line_error(proc, said, "nothing was exported", "--ckpt_path")
    assert not (tmp_path / "export").exists()


def test_the_recipe_without_a_stop_exports_and_exits_zero(tiny_dir, tmp_path):
    proc = run("fit", "--config", str(_write(tmp_path, _recipe(tmp_path, tiny_dir))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("ckpt, said", [("recipe.yaml", "is not a checkpoint"), ("nope.ckpt", "no such checkpoint")])
def test_a_ckpt_path_that_is_no_checkpoint_is_refused_before_the_fit(tiny_dir, tmp_path, ckpt, said):
    recipe = _write(tmp_path, _recipe(tmp_path, tiny_dir))
    proc = run("fit", "--config", str(recipe), "--ckpt_path", str(tmp_path / ckpt))
    assert proc.returncode == 2
    assert_one_line_error(proc, said, ".ckpt")
    assert not (tmp_path / "root").exists()


def test_a_key_written_twice_is_refused_naming_both_lines(tiny_dir, tmp_path):
    text = yaml.safe_dump(_recipe(tmp_path, tiny_dir)).replace("  max_steps: 6\n", "  max_steps: 6\n  max_steps: 9\n")
    (tmp_path / "base.yaml").write_text(text)
    (tmp_path / "variant.yaml").write_text("config: base.yaml\nseed_everything: 1\n")  # the duplicate is in the include
    for name in ("base.yaml", "variant.yaml"):
        proc = run("fit", "--config", str(tmp_path / name))
        assert proc.returncode == 2
        assert_one_line_error(proc, "base.yaml:", "key 'max_steps' is written twice", "keep one")


@pytest.mark.parametrize("edit, said", [
    (lambda c: c["trainer"]["callbacks"][0].update(class_path="pruner.nosuch.Thing"),
     "class_path 'pruner.nosuch.Thing': No module named 'pruner.nosuch'"),
    (lambda c: c["trainer"]["callbacks"][0].update(class_path="pruner.lightning_modules.data.PruneDataModule"),
     "is not a Callback: trainer.callbacks takes Callback classes"),
    (lambda c: c["trainer"]["callbacks"][0].update(init_args=[0.5, 2]),
     "init_args of 'pruner.callbacks.StructuralPruneCallback' must be a mapping"),
    (lambda c: c["trainer"].update(precision="17"), "trainer.precision: '17' is not one of"),
    (lambda c: c.update(max_steps=5), "unknown option 'max_steps'"),
    (lambda c: c["data"].update(learning_rate=0.1), "unknown option 'data.learning_rate'"),
    (lambda c: c["trainer"]["callbacks"].append(dict(c["trainer"]["callbacks"][0])),
     "lists StructuralPruneCallback 2 times"),
    (lambda c: c["trainer"].update(default_root_dir=str(REPO / "README.md" / "x")), "is not a writable folder"),
], ids=["missing-module", "not-a-callback", "init-args-list", "bad-precision", "key-at-top", "key-in-wrong-section",
        "callback-twice", "root-under-a-file"])
def test_config_mistakes_are_one_line_naming_the_key_and_the_fix(tiny_dir, tmp_path, edit, said):
    config = _recipe(tmp_path, tiny_dir)
    edit(config)
    proc = run("fit", "--config", str(_write(tmp_path, config)))
    assert_one_line_error(proc, said)
    assert not (tmp_path / "export").exists()


def test_an_accelerator_the_machine_lacks_is_one_line(tiny_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run("fit", "--config", str(_write(tmp_path, _recipe(tmp_path, tiny_dir, accelerator="gpu"))))
    assert_one_line_error(proc, "torch sees 0 GPU(s) here", "trainer.accelerator")


def test_debug_shows_the_traceback_instead(tiny_dir, tmp_path):
    recipe = _write(tmp_path, _recipe(tmp_path, tiny_dir))
    proc = run("fit", "--config", str(recipe), "--ckpt_path", str(recipe), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_export_gguf_of_a_missing_folder_fails_at_once_without_asking_the_hub(tmp_path):
    (tmp_path / "outputs").mkdir()  # "outputs/export" reads as org/name, but "outputs" is a folder here
    proc = run("export-gguf", "outputs/export", "out.gguf", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"model folder not found: outputs/export (relative to {tmp_path})" in proc.stderr  # refused, not looked up
