"""pruner.prune on tiny models: exact counts, allocations, determinism and arguments refused before any change."""

import copy
import json

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.structure import Plan
from pruner.testing import tiny_causal_lm


def _batches(n=3, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("kw", [
    dict(target_sparsity=0.2),
    dict(target_sparsity=0.3, global_ranking=True, round_to=8),
    dict(target_sparsity=0.25, head_granularity="kv", iterative_steps=2),
    dict(pruning_ratio=0.5, mode="channel", round_to=8),
    dict(target_sparsity=0.3, mode="layer"),
])
def test_prune_reports_exact_counts_and_the_plan_rebuilds_the_model(arch, kw):
    dense = tiny_causal_lm(arch, num_hidden_layers=4, intermediate_size=128)
    model = copy.deepcopy(dense)
    plan = pruner.prune(model, _batches(), **kw)
    assert plan.params["before"] == pruner.count_parameters(dense)
    assert plan.params["after"] == pruner.count_parameters(model)
    if "target_sparsity" in kw:  # the closest the units allow: within one unit of the target
        assert abs(plan.params["removed_fraction"] - kw["target_sparsity"]) < 0.13
    # JSON round trip, then applying to a fresh dense copy reproduces the pruned model exactly
    again = Plan.from_dict(json.loads(plan.to_json()))
    rebuilt = copy.deepcopy(dense)
    pruner.apply_plan(again, rebuilt)
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits)
    for lp in plan.layers:
        if lp.heads_kept is not None and lp.kv_heads_kept is not None:
            per_group = [sum(1 for h in lp.heads_kept if h // 2 == g) for g in lp.kv_heads_kept]
            assert len(set(per_group)) == 1  # GQA stays uniform
        if kw.get("round_to") and lp.mlp_channels_kept is not None:
            assert len(lp.mlp_channels_kept) % kw["round_to"] == 0
    if plan.hidden_kept is not None:
        assert len(plan.hidden_kept) % 8 == 0


def test_local_ratio_removes_the_same_share_in_every_layer_of_the_range():
    model = tiny_causal_lm("llama", num_hidden_layers=4, intermediate_size=128)
    plan = pruner.prune(model, _batches(), pruning_ratio=0.5, attention_layers=(1, 3), mlp_layers=(0, 2))
    mlp = [len(lp.mlp_channels_kept) if lp.mlp_channels_kept is not None else 128 for lp in plan.layers]
    heads = [len(lp.heads_kept) if lp.heads_kept is not None else 4 for lp in plan.layers]
    assert mlp == [64, 64, 128, 128]
    assert heads == [4, 2, 2, 4]  # half of the 2 query heads of each of the 2 KV groups
    removed = [r for r in plan.group_records() if r["removed"] and r["kind"] == "mlp_channel" and r["layer"] == 0]
    kept_scores = [r["score"] for r in plan.group_records() if not r["removed"] and r["kind"] == "mlp_channel" and r["layer"] == 0]
    assert len(removed) == 64 and max(r["score"] for r in removed) <= min(kept_scores)


@pytest.mark.parametrize("kwargs, allocation", [
    (dict(target_sparsity=0.2), (True, "kv")),  # the best measured: global ranking of whole KV groups + MLP
    (dict(pruning_ratio=0.25), (False, "query")),  # the paper's per-layer ratio stays per layer
    (dict(target_sparsity=0.2, uniform=True), (False, "query")),  # equal layers need a ratio per layer
    (dict(target_sparsity=0.2, global_ranking=False), (False, "query")),
    (dict(target_sparsity=0.2, head_granularity="query"), (True, "query")),  # explicit values are kept
])
def test_allocation_defaults_resolve_to_the_best_measured(kwargs, allocation):
    from pruner.callbacks import StructuralPruneCallback

    assert (PruneConfig(**kwargs).global_ranking, PruneConfig(**kwargs).head_granularity) == allocation
    callback = StructuralPruneCallback(**kwargs)  # the callback's defaults are the same
    assert (callback.config.global_ranking, callback.config.head_granularity) == allocation
    model = tiny_causal_lm("mistral", num_hidden_layers=4, intermediate_size=128)
    plan = pruner.prune(model, _batches(), **kwargs)
    assert (plan.settings["global_ranking"], plan.settings["head_granularity"]) == allocation


def test_default_allocation_removes_heads_as_whole_kv_groups():
    # 8 query heads in 4 KV groups (a tiny 2-group model keeps every group under max_layer_ratio)
    model = tiny_causal_lm("mistral", num_hidden_layers=4, intermediate_size=128, num_attention_heads=8,
                           num_key_value_heads=4)
    plan = pruner.prune(model, _batches(), target_sparsity=0.1, prune_mlp=False)
    lost = [lp for lp in plan.layers if lp.heads_kept is not None]
    assert lost  # some layer lost heads
    for lp in lost:  # each as a whole KV group with both of its query heads
        assert lp.kv_heads_kept is not None and len(lp.kv_heads_kept) < 4
        assert sorted(lp.heads_kept) == sorted(h for g in lp.kv_heads_kept for h in (2 * g, 2 * g + 1))


def test_a_non_boolean_global_ranking_is_refused():
    with pytest.raises(pruner.PrunerError, match="global_ranking must be true or false"):
        PruneConfig(target_sparsity=0.2, global_ranking="true")


def test_same_seed_same_plan_bit_for_bit():
    plans = []
    for _ in range(2):
        model = tiny_causal_lm("mistral")
        plans.append(pruner.prune(model, _batches(), target_sparsity=0.2, global_ranking=True).to_json())
    assert plans[0] == plans[1]


def test_layer_mode_removes_the_least_important_layers():
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    plan = pruner.prune(model, _batches(), mode="layer", pruning_ratio=0.5, layers=(1, 4))
    scores = {r["layer"]: r["score"] for r in plan.group_records()}
    removed = [lp.index for lp in plan.layers if lp.removed]
    assert len(removed) == 2 and 0 not in removed
    assert max(scores[i] for i in removed) <= min(scores[i] for i in scores if i not in removed)
    assert model.config.num_hidden_layers == 2
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


BAD = [
    (dict(pruning_ratio=0.0), "strictly between 0 and 1"),
    (dict(pruning_ratio=1.0), "strictly between 0 and 1"),
    (dict(target_sparsity=-0.1), "strictly between 0 and 1"),
    (dict(), "exactly one of target_sparsity"),
    (dict(target_sparsity=0.2, pruning_ratio=0.2), "exactly one of target_sparsity"),
    (dict(pruning_ratio=0.2, criterion="taylor"), "unknown criterion 'taylor'"),
    (dict(pruning_ratio=0.2, aggregation="median"), "unknown aggregation"),
    (dict(pruning_ratio=0.2, mode="width"), "unknown mode 'width'"),
    (dict(pruning_ratio=0.2, attention_layers=(2, 9)), "reaches past the model's 3 layers"),
    (dict(pruning_ratio=0.2, mlp_layers=(2, 2)), "is empty"),
    (dict(target_sparsity=0.9, attention_layers=(0, 1), mlp_layers=(0, 1)), "allow at most"),
    (dict(pruning_ratio=0.2, head_granularity="token"), "head_granularity"),
    (dict(pruning_ratio=0.2, round_to=0), "round_to"),
    (dict(pruning_ratio=0.2, prune_attention=False, prune_mlp=False), "removes nothing"),
    (dict(pruning_ratio=0.2, colour="red"), "unknown prune\\(\\) option"),
    (dict(pruning_ratio=0.2, mlp_selection="obs"), "set reconstruct=True"),
    (dict(pruning_ratio=0.2, mlp_selection="obs", reconstruct=True, prune_mlp=False), "prune_mlp=True"),
    (dict(pruning_ratio=0.2, mlp_selection="best"), "mlp_selection must be"),
    (dict(pruning_ratio=0.2, mlp_selection="obs-fisher"), "'obs-fisher' chooses from the input statistics"),
    (dict(pruning_ratio=0.2, mlp_selection="obs-fisher", reconstruct=True, fisher_samples=0), "fisher_samples must be"),
    (dict(pruning_ratio=0.2, attention_selection="obs"), "set reconstruct=True"),
    (dict(pruning_ratio=0.2, attention_selection="obs", reconstruct=True, prune_attention=False), "prune_attention=True"),
    (dict(pruning_ratio=0.2, attention_selection="best"), "'score', 'measured' or 'obs'"),
    (dict(pruning_ratio=0.2, mode="channel", reconstruct=True), "removes neither: use mode='block'"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments_fail_before_the_model_changes(kwargs, message):
    model = tiny_causal_lm("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(pruner.PrunerError, match=message):
        pruner.prune(model, _batches(1), **kwargs)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_no_calibration_batches_is_refused():
    with pytest.raises(pruner.PrunerError, match="no calibration batches"):
        pruner.prune(tiny_causal_lm("llama"), [], pruning_ratio=0.2)
    # magnitude criteria need no data
    plan = pruner.prune(tiny_causal_lm("llama"), [], pruning_ratio=0.5, criterion="l2")
    assert plan.params["removed"] > 0


def test_max_tokens_per_backward_is_checked_before_any_pass():
    model = tiny_causal_lm("llama")
    with pytest.raises(pruner.PrunerError, match="max_tokens_per_backward"):
        pruner.prune(model, _batches(), target_sparsity=0.2, max_tokens_per_backward=0)
