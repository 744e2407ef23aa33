"""The generated-text cache and the data files we read: a cached chunk that is not what we wrote
is written again (or, where it may not be, refused naming the file), a failed write leaves no
partial file, and a file that is not text is refused as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pruner.data import calibration_samples, load_wikitext2_rows
from pruner.data.alpaca import alpaca_records
from pruner.data.generated import _chunk_path, _states_path, cache_key, generate_samples, read_states
from pruner.errors import PrunerError
from pruner.io import load_tokenizer
from pruner.structure import model_fingerprint
from pruner.testing import tiny_causal_lm

SETTINGS = dict(seed=0, chunk_size=4, temperature=1.0, top_p=1.0)


@pytest.fixture
def written(tiny_dir, tmp_path):
    """A tiny model, its tokenizer, and 8 x 12 tokens it wrote into a cache (2 chunks)."""
    tokenizer = load_tokenizer(str(tiny_dir))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    text = generate_samples(model, tokenizer, 8, 12, cache_dir=tmp_path / "cache", save_states=True, **SETTINGS)
    folder = tmp_path / "cache" / cache_key(model_fingerprint(model), 0, 12, 4, 1.0, 1.0)
    return model, tokenizer, text, folder


def _damage(path: Path, how: str) -> None:
    data = json.loads(path.read_text())
    if how == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif how == "fewer-rows":
        data["ids"] = data["ids"][:-1]
        path.write_text(json.dumps(data))
    elif how == "ids-beyond-vocabulary":
        data["ids"][0][3] = 10**6
        path.write_text(json.dumps(data))
    elif how == "another-chunk":
        data["chunk"] = 7
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["truncated", "fewer-rows", "ids-beyond-vocabulary", "another-chunk"])
def test_a_damaged_chunk_is_written_again_with_a_warning(written, tmp_path, how):
    model, tokenizer, text, folder = written
    _damage(_chunk_path(folder, 1), how)
    with pytest.warns(UserWarning, match=rf"chunk00001\.json .*: writing it again"):
        again = generate_samples(model, tokenizer, 8, 12, cache_dir=tmp_path / "cache", **SETTINGS)
    assert torch.equal(again, text)  # the same draws: the chunk's seed is its own


@pytest.mark.parametrize("how", ["truncated", "fewer-rows", "ids-beyond-vocabulary"])
def test_a_damaged_chunk_that_may_not_be_rewritten_is_refused_naming_the_file(written, tmp_path, how):
    model, tokenizer, _, folder = written
    _damage(_chunk_path(folder, 0), how)
    with pytest.raises(PrunerError, match=r"the cached generated text .*chunk00000\.json .*: it is not what pruner wrote"
                                          r".*delete it and it is written again"):
        generate_samples(model, tokenizer, 8, 12, cache_dir=tmp_path / "cache", allow_generation=False, **SETTINGS)


def test_teacher_states_of_another_width_are_refused_naming_the_file(written, tmp_path):
    model, _, _, folder = written
    from safetensors.torch import save_file

    save_file({"states": torch.zeros(4, 11, 7)}, str(_states_path(_chunk_path(folder, 1))))
    with pytest.raises(PrunerError, match=r"chunk00001\.states\.safetensors holds shape \(4, 11, 7\), not \(4, 11, 64\)"):
        read_states(8, 12, fingerprint=model_fingerprint(model), cache_dir=tmp_path / "cache", hidden_size=64,
                    **SETTINGS)


def test_a_failed_chunk_write_leaves_no_partial_file(tiny_dir, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(str(tiny_dir))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if ".tmp-" in self.name:
            real_write(self, text[: len(text) // 2])  # part of it reached the disk ...
            raise OSError(28, "No space left on device")  # ... then the disk filled
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        generate_samples(model, tokenizer, 4, 12, cache_dir=tmp_path / "cache", **SETTINGS)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_a_cache_dir_that_is_a_file_is_refused_before_any_generation(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_dir))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(PrunerError, match=r"the generated-text cache_dir .*cache is an existing file: give a folder"):
        generate_samples(model, tokenizer, 4, 12, cache_dir=tmp_path / "cache", **SETTINGS)


@pytest.mark.parametrize("read", [
    lambda path, tok: calibration_samples(str(path), tok, num_samples=1, seq_len=4),
    lambda path, tok: load_wikitext2_rows(path),
    lambda path, tok: alpaca_records(str(path)),
], ids=["calibration", "evaluation", "alpaca"])
def test_a_binary_file_given_as_text_is_refused_as_not_text(tiny_dir, tmp_path, read):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(PrunerError, match=r"weights\.txt is not text \(it holds NUL bytes: a binary file\?\)"):
        read(path, load_tokenizer(str(tiny_dir)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    with pytest.raises(PrunerError, match=r"latin1\.txt is not UTF-8 text"):
        read(latin1, load_tokenizer(str(tiny_dir)))
