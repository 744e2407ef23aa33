"""PruneDataModule: calibration-first train order, padding/masking, rank sharding, validation."""

import json

import pytest
import torch

from pruner.errors import PrunerError
from pruner.lightning_modules.data import PruneDataModule, _TrainStream, pad_collate

RECORDS = [
    {"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"The number is {i}."}
    for i in range(10)
]


@pytest.fixture
def alpaca(tmp_path) -> str:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return str(path)


def test_train_loader_order(tiny_dir, alpaca):
    dm = PruneDataModule(tokenizer=str(tiny_dir), calibration_samples=3, calibration_seq_len=16,
                         recovery_source=alpaca, micro_batch_size=4, recovery_epochs=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert dm.calibration_batches == 3
    assert len(batches) == len(dm.train_dataloader()) == 3 + 2 * (10 // 4)
    for b in batches[:3]:  # calibration: one full window, every token learned
        assert b["input_ids"].shape == (1, 16)
        assert torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all())
    pad = dm.tokenizer.pad_token_id
    for b in batches[3:]:  # recovery: micro-batches, prompt and padding masked
        assert b["input_ids"].shape[0] == 4
        assert bool((b["labels"][:, 0] == -100).all())
        padded = b["attention_mask"] == 0
        assert bool((b["labels"][padded] == -100).all()) and bool((b["input_ids"][padded] == pad).all())
    # The two recovery epochs are different shuffles of the same records.
    def responses(epoch_batches):
        return [tuple(t for t in row if t != -100) for b in epoch_batches for row in b["labels"].tolist()]

    first, second = responses(batches[3:5]), responses(batches[5:7])
    assert len(set(first)) == 8 and first != second


def test_no_recovery_yields_calibration_only(tiny_dir):
    dm = PruneDataModule(tokenizer=str(tiny_dir), calibration_samples=5, calibration_seq_len=12)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(b["input_ids"].shape == (1, 12) for b in batches)
    assert dm.val_dataloader() == []


def test_rank_sharding_is_disjoint_and_equal():
    recovery = [{"input_ids": [i], "attention_mask": [1], "labels": [i]} for i in range(11)]
    calib = torch.arange(6).view(3, 2)
    streams = [_TrainStream(calib[r::2][:1], recovery, 2, 1, 0, 0, rank=r, world=2) for r in (0, 1)]
    seen = [[b["input_ids"].flatten().tolist() for b in s] for s in streams]
    assert len(seen[0]) == len(seen[1]) == len(streams[0]) == 1 + 2  # 11 // 2 // 2 = 2 batches
    recovered = [i for s in seen for b in s[1:] for i in b]
    assert len(recovered) == len(set(recovered)) == 8  # no example on both ranks


def test_reconstruction_windows_are_seeded_sharded_and_batched(tiny_dir):
    from pruner.data import calibration_samples

    kwargs = dict(tokenizer=str(tiny_dir), calibration_samples=2, calibration_seq_len=16, micro_batch_size=3,
                  reconstruction_source="builtin", reconstruction_samples=7, reconstruction_seq_len=20, seed=5)
    dm = PruneDataModule(**kwargs)
    dm.setup("fit")
    batches = dm.reconstruction_batches()
    assert [tuple(b.shape) for b in batches] == [(3, 20), (3, 20), (1, 20)]
    expected = calibration_samples("builtin", dm.tokenizer, 7, 20, seed=5 + 3)  # its own seed: not the calibration
    assert torch.equal(torch.cat(batches), expected)
    assert not any(torch.equal(expected[i, :16], w) for i in range(7) for w in dm.calibration)
    shares = []
    for rank in (0, 1):  # two ranks: disjoint, equal shares (the odd window out is dropped)
        ranked = PruneDataModule(**kwargs)
        ranked._rank, ranked._world = rank, 2
        ranked.setup("fit")
        shares.append(torch.cat(ranked.reconstruction_batches()))
    assert [len(x) for x in shares] == [3, 3]
    assert torch.equal(torch.cat(shares), torch.cat([expected[0:6:2], expected[1:6:2]]))
    assert PruneDataModule(tokenizer=str(tiny_dir)).reconstruction_batches() == []


def test_pad_collate_right_pads():
    batch = pad_collate([{"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 5, 6]},
                         {"input_ids": [7], "attention_mask": [1], "labels": [7]}], pad_id=9)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [7, -100, -100]]


def test_validation_windows(tiny_dir, tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n" + " Some text of an article , with words .\n" * 80)
    dm = PruneDataModule(tokenizer=str(tiny_dir), val_source=str(raw), val_seq_len=32,
                         val_max_windows=5, micro_batch_size=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32), (1, 32)]
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in batches)


def test_builtin_heldout_validation_is_disjoint_from_the_builtin_training_text(tiny_dir):
    from pruner.data import builtin_heldout_rows, builtin_text

    dm = PruneDataModule(tokenizer=str(tiny_dir), val_source="builtin-heldout", val_seq_len=32,
                         val_max_windows=4, micro_batch_size=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32)]
    train = builtin_text()  # calibration and plain-text recovery read only this
    assert not [row for row in builtin_heldout_rows() if row in train]


def test_argument_validation_and_errors(tiny_dir, tmp_path):
    with pytest.raises(PrunerError, match=r"`PruneDataModule\(micro_batch_size\)` must be an integer >= 1, got 0"):
        PruneDataModule(micro_batch_size=0)
    with pytest.raises(PrunerError, match=r"val_max_windows\)` must be an integer >= 1, got 0 \(an int\): or None for all"):
        PruneDataModule(val_max_windows=0)
    with pytest.raises(PrunerError, match=r"`PruneDataModule\(reconstruction_samples\)` must be an integer >= 1, got 0"):
        PruneDataModule(reconstruction_samples=0)
    with pytest.raises(PrunerError, match=r"`PruneDataModule\(reconstruction_seq_len\)` must be an integer >= 2, got 1"):
        PruneDataModule(reconstruction_seq_len=1)
    with pytest.raises(PrunerError, match=r"`PruneDataModule\(generation_top_p\)` must be a number in \(0, 1\], got 1.5"):
        PruneDataModule(generation_top_p=1.5)
    with pytest.raises(PrunerError, match=r"`PruneDataModule\(generation_temperature\)` must be a finite number > 0, got 0"):
        PruneDataModule(generation_temperature=0)
    with pytest.raises(PrunerError, match=r"reconstruction_source=' '\)` must be a non-empty string"):
        PruneDataModule(reconstruction_source=" ")
    with pytest.raises(PrunerError, match="has no tokenizer: pass `tokenizer="):
        PruneDataModule().setup("fit")
    few = tmp_path / "few.json"
    few.write_text(json.dumps(RECORDS[:2]))
    dm = PruneDataModule(tokenizer=str(tiny_dir), recovery_source=str(few), micro_batch_size=4)
    with pytest.raises(PrunerError, match="fewer than one micro-batch of 4"):
        dm.setup("fit")


def test_validation_perplexity_matches_the_eval_package(tiny_dir, tmp_path):
    import lightning as L

    from pruner.eval.perplexity import perplexity
    from pruner.lightning_modules.causal_lm import CausalLMModule

    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n" + "".join(f" Sentence {i} of the article , with words .\n" for i in range(60)))
    module = CausalLMModule(str(tiny_dir))
    dm = PruneDataModule(val_source=str(raw), val_seq_len=32, val_max_windows=6, micro_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, dm)
    rows = [line + "\n" if line.strip() else "" for line in raw.read_text().split("\n")[:-1]]
    expected = perplexity(module.hf_model, module.tokenizer, rows, seq_len=32, max_tokens=6 * 32)
    assert metrics["val_ppl"] == pytest.approx(expected, rel=1e-4)
