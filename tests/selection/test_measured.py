"""Measured choice of attention removals (pruner.selection.measured): same sizes, lower calibration loss,
weights untouched, and the exhaustive choice is the brute-force optimum."""

import itertools

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.loop import estimate_importance, make_plan
from pruner.selection import refine_attention
from pruner.testing import tiny_causal_lm


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 120, (1, 16), generator=g)} for _ in range(n)]


def _loss(model, plan, batches):
    m = tiny_causal_lm("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    m.load_state_dict(model.state_dict())
    pruner.mask_plan(plan, m)
    with torch.no_grad():
        return sum(float(m(**b, labels=b["input_ids"]).loss) for b in batches) / len(batches)


@pytest.fixture
def setup():
    model = tiny_causal_lm("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    structure = pruner.discover(model)
    batches = _batches()
    return model, structure, batches


@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_refined_plan_keeps_the_sizes_leaves_weights_alone_and_does_not_raise_the_loss(setup, granularity):
    model, structure, batches = setup
    cfg = PruneConfig(criterion="element1", pruning_ratio=0.5, head_granularity=granularity)
    vectors = estimate_importance(model, [b["input_ids"] for b in batches], structure, cfg)
    plan = make_plan(structure, vectors, cfg, pruner.count_parameters(model))
    before = {n: p.clone() for n, p in model.named_parameters()}
    refined = refine_attention(model, structure, plan, batches)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    for a, b in zip(plan.layers, refined.layers):
        assert len(a.heads_kept) == len(b.heads_kept) and len(a.kv_heads_kept) == len(b.kv_heads_kept)
        assert a.mlp_channels_kept == b.mlp_channels_kept
    if granularity == "kv":  # exhaustive per layer, starting from the score choice: never worse
        assert _loss(model, refined, batches) <= _loss(model, plan, batches) + 1e-9
    kind, n, kept = ("kv_group", 4, "kv_heads_kept") if granularity == "kv" else ("attention_head", 8, "heads_kept")
    removed = {(r["layer"], r["index"]) for r in refined.group_records() if r["kind"] == kind and r["removed"]}
    assert removed == {(lp.index, h) for lp in refined.layers for h in range(n) if h not in getattr(lp, kept)}
    assert removed  # the records are there and flag the refined choice


def test_exhaustive_choice_is_the_brute_force_optimum_for_one_layer(setup):
    model, structure, batches = setup
    cfg = PruneConfig(criterion="element1", pruning_ratio=0.5, head_granularity="kv", attention_layers=(2, 3),
                      prune_mlp=False)
    vectors = estimate_importance(model, [b["input_ids"] for b in batches], structure, cfg)
    plan = make_plan(structure, vectors, cfg, pruner.count_parameters(model))
    refined = refine_attention(model, structure, plan, batches)
    losses = {}
    for gone in itertools.combinations(range(4), 2):
        p = pruner.Plan.from_dict(plan.to_dict())
        p.layers[2].kv_heads_kept = [g for g in range(4) if g not in gone]
        p.layers[2].heads_kept = [h for h in range(8) if h // 2 not in gone]
        losses[gone] = _loss(model, p, batches)
    best = min(losses, key=losses.get)
    assert refined.layers[2].kv_heads_kept == [g for g in range(4) if g not in best]


def test_all_reduce_is_used_and_the_option_is_checked(setup):
    model, structure, batches = setup
    calls = []
    cfg = PruneConfig(criterion="element1", pruning_ratio=0.5, head_granularity="kv")
    vectors = estimate_importance(model, [b["input_ids"] for b in batches], structure, cfg)
    plan = make_plan(structure, vectors, cfg, pruner.count_parameters(model))
    alone = refine_attention(model, structure, plan, batches)
    # two "ranks" holding the same data: sums double, the mean and the decisions do not change
    doubled = refine_attention(model, structure, plan, batches, all_reduce=lambda t: calls.append(1) or 2 * t)
    assert calls and doubled.layers == alone.layers
    assert PruneConfig(criterion="element1", pruning_ratio=0.5).measures_attention is False  # the paper's default
    assert PruneConfig(criterion="l2", pruning_ratio=0.5, attention_selection="measured").measures_attention is True
    assert PruneConfig(criterion="l2", pruning_ratio=0.5, attention_selection="measured",
                       prune_attention=False).measures_attention is False
    with pytest.raises(pruner.PrunerError, match="attention_selection must be 'score', 'measured' or 'obs'"):
        PruneConfig(criterion="element1", pruning_ratio=0.5, attention_selection="best")
