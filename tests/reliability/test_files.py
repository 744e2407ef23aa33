"""Files we write: never a user's folder replaced, concurrent exports, permissions, home folders, kill during export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import pruner
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT, tiny_batches


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_existing_output_folder_is_left_untouched(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    snap = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(PrunerError):
            pruner.save_pretrained(tiny_causal_lm("llama"), folder, overwrite=overwrite)
    assert snapshot(tmp_path) == snap


def test_of_two_concurrent_exports_to_a_new_folder_one_wins_and_the_other_raises(tmp_path):
    script = textwrap.dedent('''
        import sys, time
        from pathlib import Path
        import pruner, pruner.io.pretrained as io
        from pruner.testing import tiny_causal_lm
        folder, go, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        original = io._put_in_place
        def wait_then_place(tmp, target, overwrite):  # both writers reach the rename together
            (go.parent / f"ready{seed}").write_text("ready")
            while not go.exists():
                time.sleep(0.01)
            original(tmp, target, overwrite)
        io._put_in_place = wait_then_place
        try:
            pruner.save_pretrained(tiny_causal_lm("llama", seed=seed), folder)
            print("WON")
        except pruner.PrunerError as e:
            print("LOST", e)
    ''')
    (tmp_path / "writer.py").write_text(script)
    folder, go = tmp_path / "model", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(folder), str(go), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    ready = [tmp_path / f"ready{seed}" for seed in (1, 2)]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not all(r.exists() for r in ready):  # both have written their temporary folders (slow under load)
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.write_text("go")
    outs = [p.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["LOST", "WON"], outs
    assert "was written by someone else" in next(o for o in outs if o.startswith("LOST"))
    winner = 1 if outs[0].startswith("WON") else 2
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), tiny_causal_lm("llama", seed=winner).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "model", "ready1", "ready2", "writer.py"]  # no temporary folder


def test_exports_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = pruner.save_pretrained(tiny_causal_lm("llama"), tmp_path / "out", plan=pruner.prune(
            tiny_causal_lm("llama"), tiny_batches(), pruning_ratio=0.5))
    finally:
        os.umask(old)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o644)}


def test_home_folders_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    pruner.save_pretrained(tiny_causal_lm("llama"), "~/exports/tiny")
    assert (tmp_path / "exports" / "tiny" / "config.json").is_file()
    assert pruner.load_pretrained("~/exports/tiny").config.num_hidden_layers == 3
    assert not (Path.cwd() / "~").exists()


KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import pruner
    from pruner.structure import Plan
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
    deadline = time.time() + SUBPROCESS_TIMEOUT
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
    snap = snapshot(folder)
    _kill_during_export(tmp_path, folder, seed=3)
    assert snapshot(folder) == snap  # the previous export, whole
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), old.state_dict())
    stale = sorted(p.name for p in tmp_path.glob(".model.pruner-tmp-*"))
    assert len(stale) == 1  # the killed writer's temporary folder ...
    new = tiny_causal_lm("llama", seed=4)
    pruner.save_pretrained(new, folder, overwrite=True)
    assert not list(tmp_path.glob(".model.pruner-tmp-*"))  # ... is removed by the next export
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), new.state_dict())


# ----------------------------------------------------------------------------- temporary files are named and cleaned by what they are


def test_a_users_folder_named_like_an_old_temporary_export_is_never_deleted(tmp_path):
    for name in (".model.tmp-999999-abc", ".model.pruner-tmp-999999-abc"):  # the writer "pid" is long gone
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    pruner.save_pretrained(tiny_causal_lm("llama"), tmp_path / "model")
    pruner.save_pretrained(tiny_causal_lm("llama", seed=1), tmp_path / "model", overwrite=True)
    for name in (".model.tmp-999999-abc", ".model.pruner-tmp-999999-abc"):  # no marker inside: not ours
        assert (tmp_path / name / "notes.txt").read_text() == "mine"


def test_overwriting_an_export_through_a_symlink_keeps_the_link_and_leaves_nothing_behind(tmp_path):
    real = tmp_path / "exports" / "v1"
    pruner.save_pretrained(tiny_causal_lm("llama"), real)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    new = tiny_causal_lm("llama", seed=3)
    pruner.save_pretrained(new, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    torch.testing.assert_close(pruner.load_pretrained(link).state_dict(), new.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "exports"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]


def test_a_killed_gguf_export_leaves_a_temporary_file_the_next_export_removes(tiny_dir, tmp_path):
    pytest.importorskip("gguf")
    model, tokenizer = pruner.load_model(str(tiny_dir))
    target = tmp_path / "model.gguf"
    ours = tmp_path / ".model.gguf.pruner-tmp-999999-x.tmp"  # what a killed writer left: a partial GGUF
    ours.write_bytes(b"GGUF" + b"\0" * 64)
    theirs = tmp_path / ".model.gguf.pruner-tmp-999998-y.tmp"  # the same name pattern, but not a GGUF file
    theirs.write_text("a user's file")
    pruner.export_gguf(model, target, dtype="f32", tokenizer=tokenizer)
    assert target.is_file() and not ours.exists()
    assert theirs.read_text() == "a user's file"


# ----------------------------------------------------------------------------- exports edited after they were written


def _export(tmp_path, **options):
    model = tiny_causal_lm("llama")
    plan = pruner.prune(model, [], pruning_ratio=0.5, criterion="l2", **options)
    return pruner.save_pretrained(model, tmp_path / "export", plan=plan), model


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu"), ("rope_parameters", {"rope_theta": 5e5, "rope_type": "default"}),
                                        ("rms_norm_eps", 0.1)])
def test_a_config_edited_after_the_export_is_refused_naming_the_key(tmp_path, key, value):
    folder, model = _export(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    written = config[key]
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunerError, match=rf"was edited after pruner exported it \({key}: written {written!r}, now "
                                          rf"{value!r}\).*allow_edited_config=True"):
        pruner.load_pretrained(folder)
    assert getattr(pruner.load_pretrained(folder, allow_edited_config=True).config, key) == value
    config[key] = written
    config["use_cache"] = not config.get("use_cache", True)  # a harmless edit passes
    (folder / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), model.state_dict())


def test_a_plan_that_no_longer_describes_the_weights_is_refused(tmp_path):
    folder, _ = _export(tmp_path, prune_attention=False)
    plan = json.loads((folder / "plan.json").read_text())
    plan["layers"][1]["mlp_channels_kept"] = plan["layers"][1]["mlp_channels_kept"][:-1]  # one channel dropped
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PrunerError, match=r"plan\.json does not describe the weights beside it: layer 1 keeps 47 in "
                                          r"mlp_channels_kept, the weights have 48"):
        pruner.load_pretrained(folder)
    plan = json.loads((folder / "plan.json").read_text())
    plan["layers"][1]["mlp_channels_kept"].append(0)
    plan["params"]["after"] += 1
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PrunerError, match="it counts .* parameters, the weights hold"):
        pruner.load_pretrained(folder)


def test_an_uneven_export_whose_pruner_shapes_were_removed_says_so(tmp_path):
    model = tiny_causal_lm("llama")
    plan = pruner.prune(model, tiny_batches(2), target_sparsity=0.2, global_ranking=True)  # uneven widths
    folder = pruner.save_pretrained(model, tmp_path / "export", plan=plan)
    config = json.loads((folder / "config.json").read_text())
    del config["pruner_shapes"], config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunerError, match=r"has no pruner_shapes, the per-layer widths this export needs.*re-export"):
        pruner.load_pretrained(folder, allow_edited_config=True)


def test_a_sharded_folder_without_its_index_names_the_index(tmp_path):
    folder, _ = _export(tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    os.link(folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors")
    with pytest.raises(PrunerError, match=r"holds the weight shards model-0000\d-of-00002\.safetensors \.\.\. but no "
                                          r"model\.safetensors\.index\.json"):
        pruner.load_pretrained(folder)
