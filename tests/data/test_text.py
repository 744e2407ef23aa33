"""pruner.data: calibration windows, Alpaca records and masking, WikiText rows, errors."""

import json
import sys
import types

import pytest
import torch

from pruner import data as D
from pruner.errors import PrunerError
from tests.helpers import SHARED_DATA

SHARED = SHARED_DATA
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent (real-data tests need the shared data folder)"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pruner.testing import save_tiny_llama

    return D.load_tokenizer(str(save_tiny_llama(tmp_path_factory.mktemp("tiny"))))


def _contains(seq: list[int], window: list[int]) -> bool:
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1))


# ----------------------------------------------------------------------------- calibration


def test_builtin_text_is_python_prose():
    text = D.builtin_text()
    assert len(text) > 100_000
    assert "Python Software Foundation" in text  # the LICENSE
    assert "def " not in text[:2000]  # docstrings, not source code


def test_calibration_is_seeded_and_shaped(tok):
    a = D.calibration_samples("builtin", tok, num_samples=6, seq_len=24, seed=3)
    b = D.calibration_samples("builtin", tok, num_samples=6, seq_len=24, seed=3)
    c = D.calibration_samples("builtin", tok, num_samples=6, seq_len=24, seed=4)
    assert a.shape == (6, 24) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1  # not one window repeated


def test_calibration_windows_are_contiguous_text(tok, tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma delta. " * 60)
    (folder / "b.txt").write_text("one two three four five. " * 60)
    (folder / "notes.md").write_text("ignored: only .txt files are read " * 200)
    docs = [tok.encode(p.read_text(), add_special_tokens=False) for p in sorted(folder.glob("*.txt"))]
    windows = D.calibration_samples(str(folder), tok, num_samples=8, seq_len=16, seed=0)
    for w in windows.tolist():
        assert any(_contains(d, w) for d in docs), "a window must be a slice of one document"
    ignored = tok.encode("ignored", add_special_tokens=False)
    assert not any(_contains(w, ignored) for w in windows.tolist())


def test_calibration_from_list_of_texts(tok):
    out = D.calibration_samples(["short", "a much longer document " * 40], tok, num_samples=3, seq_len=20)
    assert out.shape == (3, 20)


def test_calibration_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration text not found: ./nope.txt"):
        D.calibration_samples("./nope.txt", tok)
    with pytest.raises(PrunerError, match="at least 1 calibration sample"):
        D.calibration_samples("builtin", tok, num_samples=0)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(PrunerError, match=r"seq_len=64 tokens .*smaller seq_len"):
        D.calibration_samples(str(short), tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrunerError, match="has no .txt files"):
        D.calibration_samples(str(empty), tok)
    # the text itself where its name belongs: a clear error, not the OS's "File name too long"
    with pytest.raises(PrunerError, match=r"characters of text where a file.*or the documents as a list of strings"):
        D.calibration_samples("Chapter 1\n" + "It was a dark night. " * 200, tok)
    with pytest.raises(PrunerError, match="is not a usable path"):
        D.calibration_samples("x" * 1000 + ".txt", tok)
    with pytest.raises(PrunerError, match="1260 characters of text where"):
        D.calibration_samples("It was a dark night. " * 60, tok)  # one line of prose


def test_hub_calibration_is_streamed_and_shuffled(tok, monkeypatch):
    calls = {}

    class Stream(list):
        def shuffle(self, seed, buffer_size):
            calls["shuffle"] = (seed, buffer_size)
            return self

    def load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls["args"] = (path, name, split, streaming)
        return Stream({"text": f"sentence number {i} of the book ."} for i in range(500))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = D.calibration_samples("bookcorpus", tok, num_samples=2, seq_len=32)
    assert out.shape == (2, 32)
    assert calls["args"] == ("bookcorpus/bookcorpus", None, "train", True)
    assert calls["shuffle"][0] == 0


def test_hub_failure_names_the_fix(tok, monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(PrunerError, match="internet connection, or pass a local file"):
        D.alpaca_records("yahma/alpaca-cleaned")


def _script_refusing_datasets(monkeypatch, parquet_rows=None):
    """A ``datasets`` >= 4 stand-in: refuses the main branch of a script dataset (its message as
    datasets 4 words it) and serves ``parquet_rows`` from refs/convert/parquet (None: fails too)."""
    calls = []

    class Stream(list):
        def shuffle(self, seed, buffer_size):
            return self

    def load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append({"path": path, "name": name, "split": split, **kw})
        if kw.get("revision") != "refs/convert/parquet":
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")
        if parquet_rows is None:
            raise FileNotFoundError("no parquet files")
        return parquet_rows if isinstance(parquet_rows, dict) else Stream(parquet_rows)  # dict: columns

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset, __version__="4.1.0"))
    return calls


def test_script_hub_datasets_load_from_their_parquet_conversion(tok, monkeypatch):
    calls = _script_refusing_datasets(monkeypatch, [{"text": f"line {i} of a novel ."} for i in range(300)])
    out = D.calibration_samples("bookcorpus", tok, num_samples=2, seq_len=32)
    assert out.shape == (2, 32)
    assert [c.get("revision") for c in calls] == [None, "refs/convert/parquet"]
    assert calls[1]["path"] == "bookcorpus/bookcorpus" and calls[1]["data_dir"] == "plain_text"
    from pruner.data import load_ptb_rows

    calls = _script_refusing_datasets(monkeypatch, {"sentence": ["a b c"]})
    assert load_ptb_rows(None) == ["a b c"]
    assert calls[1]["path"] == "ptb_text_only" and calls[1]["data_dir"] == "penn_treebank"


def test_script_hub_dataset_without_parquet_names_the_fixes(tok, monkeypatch):
    _script_refusing_datasets(monkeypatch, None)
    with pytest.raises(PrunerError, match=r"no longer runs.*refs/convert/parquet.*datasets<4.*'builtin'"):
        D.calibration_samples("bookcorpus", tok, num_samples=2, seq_len=32)


@needs_shared
def test_calibration_from_gutenberg(tok):
    out = D.calibration_samples(str(SHARED / "gutenberg"), tok, num_samples=10, seq_len=64)
    assert out.shape == (10, 64)
    assert len({tuple(r) for r in out.tolist()}) == 10


# ----------------------------------------------------------------------------- Alpaca


def test_format_alpaca_templates():
    no_input = D.format_alpaca({"instruction": "Name a color.", "output": "Blue."})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue."
    )
    rec = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    with_input = D.format_alpaca(rec)
    assert "paired with an input" in with_input
    assert with_input.endswith("### Input:\n2 and 3\n\n### Response:\n5")
    assert D.format_alpaca(rec, include_response=False).endswith("### Response:\n")


def test_tokenize_instruction_masks_the_prompt(tok):
    rec = {"instruction": "Name a color.", "input": "", "output": "Blue is a color."}
    out = D.tokenize_instruction(rec, tok, cutoff_len=256)
    prompt = tok(D.format_alpaca(rec, include_response=False))["input_ids"]
    n = len(prompt)
    assert out["input_ids"][:n] == prompt
    assert out["labels"][:n] == [-100] * n
    assert out["labels"][n:] == out["input_ids"][n:]
    assert out["input_ids"][-1] == tok.eos_token_id
    learned = [t for t in out["labels"] if t != -100]
    assert tok.decode(learned[:-1]) == "Blue is a color."
    assert len(out["attention_mask"]) == len(out["input_ids"]) == len(out["labels"])


def test_tokenize_instruction_truncates(tok):
    rec = {"instruction": "Repeat.", "output": "word " * 500}
    out = D.tokenize_instruction(rec, tok, cutoff_len=120)
    assert len(out["input_ids"]) == 120
    assert out["input_ids"][-1] != tok.eos_token_id  # no EOS when truncated (alpaca-lora)


def test_alpaca_records_local_and_errors(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"instruction": "i", "output": "o"},
                                {"instruction": "j", "input": "x", "output": "p"}]))
    assert D.alpaca_records(str(good)) == [
        {"instruction": "i", "input": "", "output": "o"},
        {"instruction": "j", "input": "x", "output": "p"},
    ]
    assert len(D.alpaca_records(str(good), max_records=1)) == 1
    lines = tmp_path / "a.jsonl"
    lines.write_text('{"instruction": "i", "output": "o"}\n\n{"instruction": "k", "output": "q"}\n')
    assert [r["instruction"] for r in D.alpaca_records(str(lines))] == ["i", "k"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i"}]))
    with pytest.raises(PrunerError, match=r"record 1 .* no string field 'output'"):
        D.alpaca_records(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(PrunerError, match="expected a list of records"):
        D.alpaca_records(str(obj))
    with pytest.raises(FileNotFoundError, match="Alpaca data file not found"):
        D.alpaca_records(str(tmp_path / "missing.json"))


@needs_shared
def test_real_alpaca_records(tok):
    recs = D.alpaca_records(str(SHARED / "alpaca" / "alpaca_5000.json"))
    assert len(recs) == 5000
    assert any(r["input"] for r in recs) and any(not r["input"] for r in recs)
    out = D.tokenize_instruction(recs[0], tok)
    assert out["labels"][0] == -100 and any(t != -100 for t in out["labels"])


# ----------------------------------------------------------------------------- WikiText


def test_eval_rows_layout(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Text here . \n")
    assert D.eval_text_rows(str(raw)) == ["", " = Title = \n", "", " Text here . \n"]
    with pytest.raises(FileNotFoundError):
        D.eval_text_rows(str(tmp_path / "none.raw"))
    with pytest.raises(PrunerError, match="neither a text file nor 'wikitext-2-raw-v1'"):
        D.eval_text_rows("some-dataset")


def test_eval_windows(tok):
    windows = D.eval_windows(["the quick brown fox jumps over the lazy dog\n"] * 30, tok, seq_len=16)
    ids = tok("\n\n".join(["the quick brown fox jumps over the lazy dog\n"] * 30),
              add_special_tokens=False)["input_ids"]
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    with pytest.raises(PrunerError, match="fewer than one window of 128"):
        D.eval_windows(["tiny"], tok, seq_len=128)


@needs_shared
def test_real_wikitext_rows():
    rows = D.eval_text_rows(str(SHARED / "wikitext2_raw" / "wiki.test.raw"))
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
