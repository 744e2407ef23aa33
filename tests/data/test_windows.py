"""Window protocols (pruner.data.windows): windows start with BOS where the tokenizer adds one,
the paper's protocol stays available by name, perplexity scores the same tokens under both, and
every result names the protocol that produced it."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from pruner.data import (added_bos, calibration_samples, eval_windows, load_tokenizer, resolve_protocol,
                         tokenize_rows)
from pruner.errors import PrunerError
from pruner.eval.perplexity import loader_perplexity, perplexity
from pruner.lightning_modules.data import PruneDataModule
from tests.helpers import needs_smollm2

ROWS = ["The history of the city begins with a small harbour and a market.\n", "",
        "It grew when the railway came, and its people built schools and a library.\n"] * 20


def bos_tokenizer(folder):
    """The tiny tokenizer, made to put <s> in front of what it encodes (as Llama 3's and Gemma's do)."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(str(folder))
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.fixture(scope="module")
def bos_dir(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bos") / "tiny"
    shutil.copytree(tiny_dir, folder)
    bos_tokenizer(tiny_dir).save_pretrained(folder)
    return folder


def test_the_protocol_follows_what_the_tokenizer_adds(tiny_dir, bos_dir):
    plain, bos = load_tokenizer(str(tiny_dir)), load_tokenizer(str(bos_dir))
    assert added_bos(plain) is None and added_bos(bos) == bos.bos_token_id == 1
    assert resolve_protocol(plain) == ("paper", None) and resolve_protocol(bos) == ("bos", 1)
    assert resolve_protocol(bos, "paper") == ("paper", None)  # LLM-Pruner's tables, by name
    assert resolve_protocol(plain, "bos") == ("bos", 1)  # asked for: the tokenizer's bos_token
    with pytest.raises(PrunerError, match="window protocol must be one of 'auto', 'paper', 'bos'"):
        resolve_protocol(plain, "lm-eval")


def test_bos_windows_hold_the_same_text_after_bos(bos_dir):
    tok = load_tokenizer(str(bos_dir))
    paper = calibration_samples(ROWS, tok, 4, 16, seed=3, protocol="paper")
    auto = calibration_samples(ROWS, tok, 4, 16, seed=3)
    assert paper.shape == (4, 16) and auto.shape == (4, 17)
    assert (auto[:, 0] == 1).all() and torch.equal(auto[:, 1:], paper)
    windows = eval_windows(ROWS, tok, 16)
    assert windows.shape[1] == 17 and torch.equal(windows[:, 1:], eval_windows(ROWS, tok, 16, "paper"))


class Unigram(torch.nn.Module):
    """Logits that ignore the context: a token's NLL depends on that token alone."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.w.expand(*input_ids.shape, -1)})()


def test_perplexity_scores_the_same_tokens_under_both_protocols(tiny_dir, bos_dir):
    from pruner.io import load_model

    tok = load_tokenizer(str(bos_dir))
    # a model that ignores context gives both protocols the same figure only if they score the
    # same tokens: a BOS scored, or the first text token scored under one of them, would move it
    unigram = Unigram(len(tok))
    assert perplexity(unigram, tok, ROWS, seq_len=16) == pytest.approx(
        perplexity(unigram, tok, ROWS, seq_len=16, protocol="paper"), rel=1e-12)
    model, _ = load_model(str(tiny_dir))
    paper = perplexity(model, tok, ROWS, seq_len=16, protocol="paper")
    bos = perplexity(model, tok, ROWS, seq_len=16)
    assert paper != bos  # the context differs
    # the same figure from the datamodule's validation batches (labels -100 on the first text token)
    dm = PruneDataModule(tokenizer=str(bos_dir), val_source="builtin-heldout", val_seq_len=16, val_max_windows=6)
    dm.setup("validate")
    assert dm.protocol == "bos"
    batch = next(iter(dm.val_dataloader()))
    # label t is predicted at position t - 1: label 0 (BOS) never is, label 1 (the first text token) is masked
    assert (batch["labels"][:, 1] == -100).all() and (batch["labels"][:, 2:] == batch["input_ids"][:, 2:]).all()
    windows = dm.val_windows
    by_loader = loader_perplexity(model, dm.val_dataloader())
    ids = windows.numel() - 2 * len(windows)  # seq_len - 1 scored tokens per window
    assert ids == len(windows) * 15
    from pruner.eval.perplexity import window_nll

    manual = math.exp(window_nll(model, windows, prefix=1).sum().item() / ids)
    assert by_loader == pytest.approx(manual, rel=1e-9)


def test_a_tokenizer_without_bos_keeps_the_paper_windows(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    ids = tokenize_rows(tok, ROWS)
    windows = eval_windows(ROWS, tok, 16)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    dm = PruneDataModule(tokenizer=str(tiny_dir), val_source="builtin-heldout", val_seq_len=16, val_max_windows=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert dm.protocol == "paper" and torch.equal(batch["labels"], batch["input_ids"])


@needs_smollm2
def test_smollm2_adds_no_bos_so_its_windows_do_not_move():
    tok = load_tokenizer("smollm2")
    assert resolve_protocol(tok) == ("paper", None)
    assert torch.equal(eval_windows(ROWS, tok, 16), eval_windows(ROWS, tok, 16, "paper"))


def test_reports_name_the_protocol(tiny_dir, bos_dir):
    from pruner.callbacks.report import pruning_report
    from pruner.eval.report import compare, format_tables
    from pruner.io import load_model
    from pruner.structure import Plan

    plan = Plan(layers=[], params={"before": 10, "after": 8, "removed": 2, "removed_fraction": 0.2})
    assert "protocol 'bos' (each window after the tokenizer's BOS token)" in pruning_report(plan, {"dense": 3.0}, 0, "bos")
    assert "as the datamodule made them" in pruning_report(plan, {"dense": 3.0}, 0, None)
    model, _ = load_model(str(tiny_dir))
    results = compare({"plain": (model, load_tokenizer(str(tiny_dir))), "bos": (model, load_tokenizer(str(bos_dir)))},
                      wikitext=ROWS, max_tokens=256, seq_len=16, prompts=[], latency={"skip": True})
    assert results["models"]["plain"]["wikitext2_protocol"] == "paper"
    assert results["models"]["bos"]["wikitext2_protocol"] == "bos"
    assert results["meta"]["settings"]["protocol"] == "auto"
    text = format_tables(results)
    assert "plain: no BOS in any window" in text and "bos: each window after the tokenizer's BOS" in text


def test_generated_text_starts_with_bos_under_the_bos_protocol(tiny_dir, bos_dir, tmp_path):
    from pruner.data.generated import PROMPTS, cache_key, generate_samples, read_states
    from pruner.io import load_model
    from pruner.structure import model_fingerprint

    model, _ = load_model(str(tiny_dir))
    tok = load_tokenizer(str(bos_dir))
    settings = dict(seed=1, chunk_size=4, cache_dir=tmp_path)
    with_bos = generate_samples(model, tok, 4, 12, save_states=True, prompt_bos=1, **settings)
    without = generate_samples(model, tok, 4, 12, **settings)
    prompts = {tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS}
    for row, plain in zip(with_bos.tolist(), without.tolist()):
        assert row[0] == 1 and plain[0] != 1  # BOS, then the prompt the model continues
        assert any(tuple(row[1 : 1 + len(p)]) == p for p in prompts)
    fp = model_fingerprint(model)
    assert cache_key(fp, 1, 12, 4, 1.0, 1.0, 1) != cache_key(fp, 1, 12, 4, 1.0, 1.0)  # kept apart in the cache
    hidden = model.config.hidden_size
    states = read_states(4, 12, fingerprint=fp, prompt_bos=1, hidden_size=hidden, **settings)
    assert states is not None and states.shape == (4, 11, hidden)
    assert read_states(4, 12, fingerprint=fp, hidden_size=hidden, **settings) is None  # the other text has none
