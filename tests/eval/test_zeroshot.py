"""Zero-shot accuracy against a hand computation on a tiny random model and a local JSONL file."""

import json

import pytest
import torch

from pruner.eval.zeroshot import (
    continuation_logprobs,
    encode_pair,
    evaluate_zeroshot,
    lm_eval_version,
    load_items,
    make_request,
)
from pruner.testing import tiny_llama, tiny_tokenizer
from tests.helpers import SHARED_DATA

WORDS = "the cat dog sat on mat park sun river sea birds sing books robots yes no".split()
DATA = SHARED_DATA / "zeroshot"


def make_items(n: int = 20, seed: int = 2) -> list[dict]:
    """Deterministic items whose choices differ a lot in length (so acc and acc_norm can differ)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        pick = lambda m: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (m,), generator=g))
        n_choices = 2 + k % 3
        choices = [pick(1 + (3 * c + k) % 5) for c in range(n_choices)]
        if k % 4 == 0:  # BoolQ-like one-token choices: their pairs share one forward pass
            choices, n_choices = ["yes", "no"], 2
        items.append({"query": f"Question : {pick(4)} ?\n", "choices": choices, "gold": k % n_choices})
    return items


def hand_loglikelihoods(model, tok, items):
    """One unbatched, unpadded forward pass per (item, choice), no code shared with the module."""
    out = []
    for item in items:
        ctx = tok.encode(item["query"].rstrip() + "\nAnswer:", add_special_tokens=False)
        lls = []
        for choice in item["choices"]:
            cont = tok.encode(choice, add_special_tokens=False)  # word-level: concatenative
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        out.append(lls)
    return out


def hand_scores(model, tok, items):
    """acc / acc_norm from the hand log-likelihoods."""
    acc = acc_norm = 0
    for item, lls in zip(items, hand_loglikelihoods(model, tok, items)):
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]
        acc += int(torch.tensor(lls).argmax()) == item["gold"]
        acc_norm += int(torch.tensor(norm).argmax()) == item["gold"]
    return acc / len(items), acc_norm / len(items)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    folder = tmp_path_factory.mktemp("zs")
    items = make_items()
    (folder / "toy.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return model, tok, folder, items


def test_hand_scores_are_informative(setup):
    model, tok, _, items = setup
    acc, acc_norm = hand_scores(model, tok, items)
    # The fixture must separate the two metrics, otherwise the tests below check less.
    assert acc != acc_norm


def test_builtin_loglikelihoods_match_hand(setup):
    model, tok, _, items = setup
    pairs = [encode_pair(tok, *make_request(i["query"], c)) for i in items for c in i["choices"]]
    got = continuation_logprobs(model, pairs, batch_size=5)  # padded, deduplicated batches
    expected = [ll for lls in hand_loglikelihoods(model, tok, items) for ll in lls]
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(map(tuple, (c[0] + c[1][:-1] for c in pairs)))) < len(pairs)  # sharing happened


def test_builtin_matches_hand(setup):
    model, tok, folder, items = setup
    res = evaluate_zeroshot(model, tok, ["toy"], data_dir=folder, batch_size=3, backend="builtin")
    acc, acc_norm = hand_scores(model, tok, items)
    assert res["toy"]["n"] == 20
    assert res["toy"]["acc"] == pytest.approx(acc)
    assert res["toy"]["acc_norm"] == pytest.approx(acc_norm)
    assert res["toy"]["backend"] == "builtin"


def test_limit_takes_first_items(setup):
    model, tok, folder, items = setup
    res = evaluate_zeroshot(model, tok, ["toy"], data_dir=folder, limit=7, backend="builtin")
    acc, acc_norm = hand_scores(model, tok, items[:7])
    assert res["toy"]["n"] == 7
    assert (res["toy"]["acc"], res["toy"]["acc_norm"]) == pytest.approx((acc, acc_norm))


@pytest.mark.skipif(lm_eval_version() is None, reason="lm-eval is not installed (pip install lm-eval)")
def test_lm_eval_matches_hand(setup):
    model, tok, folder, items = setup
    res = evaluate_zeroshot(model, tok, ["toy"], data_dir=folder, batch_size=4, backend="lm-eval")
    acc, acc_norm = hand_scores(model, tok, items)
    assert res["toy"]["n"] == 20
    assert res["toy"]["acc"] == pytest.approx(acc)
    assert res["toy"]["acc_norm"] == pytest.approx(acc_norm)
    assert res["toy"]["backend"] == f"lm-eval {lm_eval_version()}"


def test_missing_file_names_path(tmp_path, setup):
    model, tok, _, _ = setup
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        evaluate_zeroshot(model, tok, ["nope"], data_dir=tmp_path, backend="builtin")


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/zeroshot is absent (dev data only)")
def test_local_files_have_the_expected_layout():
    for name, n_choices in [("piqa", 2), ("arc_easy", 4), ("boolq", 2)]:
        items = load_items(DATA / f"{name}.jsonl", limit=50)
        assert len(items) == 50
        assert all(len(i["choices"]) == n_choices and 0 <= i["gold"] < n_choices for i in items)
