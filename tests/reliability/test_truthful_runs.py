"""Runs do what was asked or say they did not: a fit that cannot reach its prune step is refused
with the numbers (and leaves the optimizers as they were), a resume that would recalibrate on
batches already seen is refused, a calibration batch that runs no backward is not counted, and
options the given batches cannot honour are refused instead of recorded as if they had run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import pruner
from pruner.callbacks import StructuralPruneCallback
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import cpu_trainer, tiny_batches


class Finetune(L.LightningModule):
    """A user's module; ``skip`` are batch indices whose training_step returns None."""

    def __init__(self, skip: tuple[int, ...] = ()):
        super().__init__()
        self.model = tiny_causal_lm("llama")
        self.skip = skip

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip:
            return None
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class ThreeBatches(IterableDataset):
    """An IterableDataset without a length: Lightning cannot know an epoch holds 3 batches."""

    def __iter__(self):
        yield from tiny_batches(3, shape=(2, 16))


def test_an_epoch_shorter_than_calibration_is_refused_with_the_numbers_and_the_optimizer_runs_again(tmp_path):
    module = Finetune()
    prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=4, verbose=False)
    with pytest.raises(PrunerError, match=r"the first epoch ended after 3 train batches, before the prune step after "
                                          r"batch 4: the model was not pruned"):
        cpu_trainer(tmp_path, [prune], max_epochs=3).fit(module, DataLoader(ThreeBatches(), batch_size=None))
    assert prune.plan is None
    optimizers = module.trainer.optimizers
    assert optimizers and all("step" not in vars(opt) for opt in optimizers)  # the pause was lifted


def test_a_fit_stopped_early_by_another_callback_fails_instead_of_warning(tmp_path):
    class StopNow(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = True

    prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=3, verbose=False,
                                    export_dir=str(tmp_path / "export"))
    with pytest.raises(PrunerError, match=r"fit stopped before the prune step after batch 3 .* nothing was exported"):
        cpu_trainer(tmp_path, [prune, StopNow()], max_steps=10).fit(Finetune(), DataLoader(tiny_batches(8, shape=(2, 16)),
                                                                                           batch_size=None))
    assert not (tmp_path / "export").exists()


def test_a_calibration_batch_whose_training_step_returns_none_is_not_counted(tmp_path):
    batches = tiny_batches(6, shape=(2, 16))
    prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=4, verbose=False)
    cpu_trainer(tmp_path, [prune], max_steps=5).fit(Finetune(skip=(1,)), DataLoader(batches, batch_size=None))
    assert prune.plan.calibration["batches"] == 3 and prune.plan.calibration["samples"] == 6
    reference = pruner.prune(tiny_causal_lm("llama"), [batches[i] for i in (0, 2, 3)], pruning_ratio=0.5)
    assert prune.plan.layers == reference.layers  # the same scores as the three batches that ran


def test_a_resume_in_calibration_with_a_loader_that_restarts_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = tiny_batches(8, shape=(2, 16))

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("stopped")

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    first = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=4, verbose=False)
    with pytest.raises(RuntimeError, match="stopped"):
        cpu_trainer(tmp_path, [first, checkpoints, Stop()], max_steps=6, enable_checkpointing=True).fit(
            Finetune(), DataLoader(batches, batch_size=None))
    again = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=4, verbose=False)
    with pytest.raises(PrunerError, match=r"resumes in the middle of calibration \(2 batches recorded\), but its train "
                                          r"loader \(DataLoader\) has no state_dict/load_state_dict"):
        cpu_trainer(tmp_path, [again], max_steps=6).fit(Finetune(), DataLoader(batches, batch_size=None),
                                                        ckpt_path=str(tmp_path / "ck" / "step=2.ckpt"))
    assert again.plan is None


@pytest.mark.parametrize("options, said", [
    (dict(criterion="l1", attention_selection="measured"), "attention_selection='measured' chooses heads by the "
                                                           "calibration loss, but no calibration batch"),
    (dict(criterion="random", reconstruct=True), "reconstruct=True refits on the inputs of the pruned layers, but no "
                                                 "batch was given"),
    (dict(criterion="l2", reconstruct=True, mlp_selection="obs"), "reconstruct=True refits"),
])
def test_options_that_batch_free_pruning_cannot_honour_are_refused_not_recorded(options, said):
    model = tiny_causal_lm("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(PrunerError, match=said):
        pruner.prune(model, [], pruning_ratio=0.5, **options)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
