"""The undo log's tensors in files (Transaction.spill): moved out of memory, read back exactly by a
rollback, the folder gone when the transaction ends either way, a full disk refused with the fix."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import pruner
from pruner.errors import PrunerError
from pruner.refit import regional
from pruner.structure import spill
from pruner.structure.surgery import Transaction
from pruner.tempfiles import temporary_folder
from pruner.testing import tiny_causal_lm

COMMON = dict(pruning_ratio=0.5, prune_attention=False, reconstruct=True, mlp_selection="obs")


@pytest.fixture
def tmp_folder(monkeypatch, tmp_path):
    """TMPDIR for this test: where the undo folders go."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _text(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 120, (2, 16), generator=g) for _ in range(n)]


def _slice_and_replace(tx: Transaction, linear: nn.Linear) -> tuple[nn.Parameter, nn.Parameter]:
    """Columns 1 and 3 of ``linear.weight`` go (a refit replaces the kept block), then the pruned
    weight is replaced whole (as a regional fit does): both recorded in ``tx``."""
    old = linear.weight
    keep, removed = torch.tensor([0, 2]), torch.tensor([1, 3])
    refit = nn.Parameter(torch.full((3, 2), 7.0))
    tx.shrink_parameter(old, refit, [(linear, "weight")], [(1, keep, removed, old.data[:, removed].clone())],
                        kept_old=old.data[:, keep].clone())
    fitted = nn.Parameter(torch.full((3, 2), 9.0))
    tx.set_parameter(linear, "weight", fitted)
    return refit, fitted


@pytest.mark.parametrize("end", ["rollback", "commit"])
def test_spilled_undo_data_leaves_memory_and_a_rollback_reads_it_back_exactly(end, tmp_folder):
    linear = nn.Linear(4, 3, bias=False)
    dense, weight = linear.weight.detach().clone(), linear.weight
    tx = Transaction()
    refit, _ = _slice_and_replace(tx, linear)
    moved = tx.spill()
    # the removed slab and the old kept block (2 x 3 x 2 floats) and the replaced refit weight (3 x 2)
    assert moved == 3 * (3 * 2 * 4)
    assert refit.numel() == 0 and len(list(tmp_folder.glob(".pruner-undo.pruner-tmp-*/*.safetensors"))) == 3
    assert tx.spill() == 0  # nothing twice
    getattr(tx, end)()
    assert not list(tmp_folder.glob(".pruner-undo.pruner-tmp-*"))  # the folder goes either way
    if end == "rollback":
        assert linear.weight is weight and torch.equal(linear.weight, dense)


def test_a_walk_that_fails_on_a_later_layer_undoes_the_spilled_layers_exactly(monkeypatch, tmp_folder):
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spilled, calls = [], []
    put, fit = spill.SpillFolder.put, regional.fit_mlp

    def counting_put(self, tensor):
        spilled.append(tensor.numel())
        return put(self, tensor)

    def fail_on_the_third_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory in the third layer")
        return fit(*args, **kwargs)

    monkeypatch.setattr(spill.SpillFolder, "put", counting_put)
    monkeypatch.setattr(regional, "fit_mlp", fail_on_the_third_layer)
    with pytest.raises(RuntimeError, match="third layer"):
        pruner.prune(model, _text()[:2], reconstruction_batches=_text(), regional_epochs=1, **COMMON)
    assert spilled  # two layers' undo data went to files before the failure
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert not list(tmp_folder.glob(".pruner-undo.pruner-tmp-*"))


def test_a_full_disk_is_refused_with_the_fix_and_the_model_stays(monkeypatch, tmp_folder):
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill, "save_file", no_space)
    with pytest.raises(PrunerError, match=r"could not write the undo data.*No space left.*set TMPDIR"):
        pruner.prune(model, _text()[:2], reconstruction_batches=_text(), **COMMON)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not list(tmp_folder.glob(".pruner-undo.pruner-tmp-*"))


def test_the_walk_makes_the_same_plan_and_weights_as_without_spilling(monkeypatch, tmp_folder):
    dense = tiny_causal_lm("qwen2", num_hidden_layers=4)
    runs = []
    for spills in (True, False):
        if not spills:
            monkeypatch.setattr(Transaction, "spill", lambda self: 0)
        model = tiny_causal_lm("qwen2", num_hidden_layers=4)
        model.load_state_dict(dense.state_dict())
        runs.append((pruner.prune(model, _text()[:2], reconstruction_batches=_text(), regional_epochs=1, **COMMON),
                     model.state_dict()))
    assert runs[0][0].layers == runs[1][0].layers and not runs[0][0].is_identity
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k])
    assert not list(tmp_folder.glob(".pruner-undo.pruner-tmp-*"))  # committed: the folder is gone


KILLED_WALK = """
import os, signal, torch
from pruner.structure.spill import SpillFolder
folder = SpillFolder()
folder.put(torch.ones(8))
print(folder.folder, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no finalizer, no atexit: the folder stays behind
"""


def test_the_undo_folder_of_a_killed_walk_is_deleted_by_the_next_one_and_nothing_else(tmp_folder):
    env = {**os.environ, "TMPDIR": str(tmp_folder)}
    child = subprocess.run([sys.executable, "-c", KILLED_WALK], env=env, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = Path(child.stdout.strip())
    assert left.parent == tmp_folder and (left / "0.safetensors").is_file()
    alive = temporary_folder(tmp_folder, spill.FOLDER_NAME)  # a walk still running (this process)
    lookalike = tmp_folder / f".{spill.FOLDER_NAME}.pruner-tmp-999999999-x"  # no marker: not ours
    lookalike.mkdir()
    folder = spill.SpillFolder()
    folder.put(torch.zeros(2))
    assert not left.exists()
    assert alive.is_dir() and lookalike.is_dir() and folder.folder.is_dir()
    folder.close()
