"""Perplexity (paper protocol) against a hand loop over windows; row loading; real-model figure."""

import math

import pytest
import torch

from pruner.data import load_ptb_rows, load_wikitext2_rows, tokenize_rows
from pruner.eval.perplexity import perplexity
from pruner.testing import CORPUS, tiny_llama, tiny_tokenizer
from tests.helpers import SHARED_DATA

WIKI = SHARED_DATA / "wikitext2_raw" / "wiki.test.raw"
ROWS = [s + "\n" for s in CORPUS] * 6  # ~500 word-level tokens


def hand_perplexity(model, ids: list[int], seq_len: int) -> float:
    """One window at a time through the model's own loss (mean NLL over seq_len-1 targets)."""
    losses = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = torch.tensor([ids[start : start + seq_len]])
        with torch.no_grad():
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(vocab_size=len(tok)), tok


def test_matches_hand_loop(tiny):
    model, tok = tiny
    ids = tok.encode("\n\n".join(ROWS), add_special_tokens=False)
    assert len(ids) > 3 * 32
    expected = hand_perplexity(model, ids, 32)
    assert perplexity(model, tok, ROWS, seq_len=32, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # A random model is far from uniform over its vocabulary and far from perfect.
    assert 1.5 < expected and abs(expected - len(tok)) > 1


def test_max_tokens_and_incomplete_window(tiny):
    model, tok = tiny
    ids = tok.encode("\n\n".join(ROWS), add_special_tokens=False)
    # 100 tokens -> three windows of 32, the last 4 tokens are dropped.
    expected = hand_perplexity(model, ids[:96], 32)
    assert perplexity(model, tok, ROWS, seq_len=32, max_tokens=100) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, ROWS, seq_len=32, max_tokens=96) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, ROWS, seq_len=32, max_tokens=128) != pytest.approx(expected, rel=1e-5)


def test_batch_size_does_not_change_result(tiny):
    model, tok = tiny
    a = perplexity(model, tok, ROWS, seq_len=16, batch_size=1)
    b = perplexity(model, tok, ROWS, seq_len=16, batch_size=7)
    assert a == pytest.approx(b, rel=1e-9)


def test_no_special_tokens_and_too_short(tiny):
    model, tok = tiny
    ids = tokenize_rows(tok, ["the cat", "the dog"])
    assert tok.bos_token_id not in ids.tolist()
    assert ids.tolist() == tok.encode("the cat\n\nthe dog", add_special_tokens=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, ["the cat"], seq_len=32)


def test_raw_file_rows(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Title = \n \n Some text . \n")
    assert load_wikitext2_rows(path) == ["", " = Title = \n", "", " Some text . \n"]
    with pytest.raises(FileNotFoundError, match="missing.raw"):
        load_wikitext2_rows(tmp_path / "missing.raw")


def test_ptb_rows(tmp_path):
    path = tmp_path / "ptb.test.txt"
    path.write_text(" no it was n't black monday \n\n the <unk> fell \n")
    assert load_ptb_rows(path) == ["no it was n't black monday", "the <unk> fell"]
    with pytest.raises(FileNotFoundError, match="ptb.missing"):
        load_ptb_rows(tmp_path / "ptb.missing")


@pytest.mark.skipif(not WIKI.is_file(), reason="../shared/data/wikitext2_raw is absent (dev data only)")
def test_wikitext2_file_layout():
    rows = load_wikitext2_rows(WIKI)
    assert len(rows) == 4358  # the Hugging Face wikitext-2-raw-v1 test split has 4,358 rows
    assert rows[:2] == ["", " = Robert Boulter = \n"]
