"""Importance, aggregation, selection, prune() and plans on tiny models, against hand computations."""

import copy
import json

import pytest
import torch

import pruner
from pruner.importance import aggregate
from pruner.loop import estimate_importance, families_for
from pruner.config import PruneConfig
from pruner.structure import discover
from pruner.importance import family_scores, ImportanceEstimator
from pruner.structure import Plan
from pruner.testing import tiny_causal_lm


def _batches(n=3, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (b, t), generator=g) for _ in range(n)]


def _manual_mean_grad(model, batches, per_sample=False):
    """Mean per-sample gradient (and Fisher) of q_proj of layer 0, by hand."""
    w = model.model.layers[0].self_attn.q_proj.weight
    total, fisher, n = torch.zeros_like(w), torch.zeros_like(w), 0
    for batch in batches:
        rows = [batch[i:i + 1] for i in range(len(batch))] if per_sample else [batch]
        for x in rows:
            model.zero_grad()
            model(x, labels=x).loss.backward()
            total += w.grad * len(x)
            fisher += w.grad.square()
            n += len(x)
    model.zero_grad(set_to_none=True)
    return w.detach(), total / n, fisher / n


@pytest.mark.parametrize("criterion", ["element1", "vector", "element2", "mix", "l1", "l2"])
def test_per_index_saliences_match_hand_computation(criterion):
    model = tiny_causal_lm("llama")
    batches = _batches()
    per_sample = criterion in ("element2", "mix")
    w, g, fisher = _manual_mean_grad(copy.deepcopy(model), batches, per_sample)
    s = discover(model)
    v = estimate_importance(model, batches, s, PruneConfig(criterion=criterion, pruning_ratio=0.5))
    got = v[("model.layers.0.self_attn.q_proj.weight", 0)]
    expected = {
        "element1": (w * g).abs().sum(1),
        "vector": (w * g).sum(1),
        "element2": 0.5 * (w.square() * fisher).sum(1),
        "mix": (w * g).abs().sum(1) + 0.5 * (w.square() * fisher).sum(1),
        "l1": w.abs().sum(1),
        "l2": w.square().sum(1),
    }[criterion]
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-9)


def test_activation_criterion_weighs_weights_by_input_norms():
    model = tiny_causal_lm("llama")
    batches = _batches()
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    x = torch.cat(seen)  # (tokens, 96)
    norm = (x.square().sum(0) / len(x)).sqrt()
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    v = estimate_importance(model, batches, discover(model), PruneConfig(criterion="activation", pruning_ratio=0.5))
    torch.testing.assert_close(v[("model.layers.0.mlp.down_proj.weight", 1)], (w.abs() * norm).sum(0))


def test_vector_criterion_takes_abs_of_the_whole_group_sum():
    model = tiny_causal_lm("llama")
    batches = _batches()
    s = discover(model)
    w, g, _ = _manual_mean_grad(copy.deepcopy(model), batches)
    v = estimate_importance(model, batches, s, PruneConfig(criterion="vector", pruning_ratio=0.5))
    heads = s.layers[0].attention.heads
    scores = family_scores(heads, v, "vector", "sum")
    q_rows = heads.members[0].indices  # (4 heads, 16 rows)
    q_part = torch.stack([(w * g)[rows].sum().abs() for rows in q_rows]).double()
    # group score = |sum over its q rows| + |sum over its o columns| >= the q member alone
    assert scores.shape == (4,) and (scores >= q_part * (1 - 1e-4)).all()
    only_q = type(heads)(heads.kind, heads.layer, [heads.members[0]])
    torch.testing.assert_close(family_scores(only_q, v, "vector", "sum"), q_part, rtol=1e-4, atol=1e-9)


def test_aggregators():
    s = torch.tensor([[1.0, 4.0], [3.0, 2.0]], dtype=torch.float64)
    assert aggregate(s, "sum").tolist() == [4.0, 6.0]
    assert aggregate(s, "mean").tolist() == [2.0, 3.0]
    assert aggregate(s, "max").tolist() == [3.0, 4.0]
    assert aggregate(s, "last").tolist() == [3.0, 2.0]
    torch.testing.assert_close(aggregate(s, "prod").exp(), torch.tensor([3.0, 8.0], dtype=torch.float64))
    with pytest.raises(pruner.PrunerError, match="unknown aggregation 'median'"):
        aggregate(s, "median")


def test_estimation_leaves_weights_and_flags_untouched():
    model = tiny_causal_lm("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    estimate_importance(model, _batches(), discover(model), PruneConfig(criterion="mix", pruning_ratio=0.5))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None


def test_second_order_needs_single_sample_batches():
    model = tiny_causal_lm("llama")
    s = discover(model)
    est = ImportanceEstimator(model, families_for(s, PruneConfig(criterion="element2", pruning_ratio=0.5)), "element2")
    with pytest.raises(pruner.PrunerError, match="per-sample gradients"):
        est.begin_batch(4)


def test_nan_gradient_is_reported():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(pruner.PrunerError, match="NaN"):
        pruner.prune(model, _batches(1), pruning_ratio=0.5)


def test_a_scored_tensor_that_gets_no_gradient_is_reported():
    model = tiny_causal_lm("llama")
    with torch.no_grad():  # nothing of layer 1's attention reaches the loss any more
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    with pytest.raises(pruner.PrunerError, match=r"layers\.1\.self_attn\.[qkv]_proj\.weight received no gradient"):
        pruner.prune(model, _batches(1), pruning_ratio=0.5)


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


def test_reconstruction_refits_kept_columns_to_the_dense_output():
    torch.manual_seed(0)
    batches = _batches(4, 4, 32)
    errors = {}
    for reconstruct in (False, True):
        dense = tiny_causal_lm("llama", num_hidden_layers=4, intermediate_size=128)
        model = copy.deepcopy(dense)
        # the paper's allocation (a ratio per layer): global ranking on a random tiny model takes
        # groups whose removal barely moves the output, leaving the refit little to repair
        plan = pruner.prune(model, batches, target_sparsity=0.3, reconstruct=reconstruct, global_ranking=False)
        assert plan.settings["reconstruct"] is reconstruct
        x = torch.cat(batches)
        errors[reconstruct] = (model(x).logits - dense(x).logits).pow(2).mean().item()
    assert errors[True] < 0.2 * errors[False]  # measured: 0.0004 vs 0.018


def _down_proj_statistics(model, down: str):
    """A GramCollector that has seen 8 random sequences of 32 tokens at ``down``'s input."""
    from pruner.refit import GramCollector

    collector = GramCollector(model, [down])
    collector.attach()
    with torch.no_grad():
        model(torch.cat(_batches(2, 4, 32)))
    collector.detach()
    return collector


def test_gram_collector_sums_the_input_products_in_fp64():

    model = tiny_causal_lm("llama")
    down = "model.layers.1.mlp.down_proj"
    inputs = []
    handle = model.get_submodule(down).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    collector = _down_proj_statistics(model, down)
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()  # (tokens, in)
    assert collector.tokens[down] == x.shape[0] == 8 * 32
    assert collector.grams[down].dtype == torch.float64
    exact = x.T @ x
    # fp32 products (on CPU) within 1e-6 of the matrix's scale; fp16/bf16 ones would be ~1e-3 off
    torch.testing.assert_close(collector.grams[down], exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


def test_collect_inputs_stops_each_forward_at_its_last_consumer_with_the_same_statistics():
    from pruner.refit import collect_inputs
    from pruner.refit import GramCollector

    model = tiny_causal_lm("llama")
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    batches = [torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: head_calls.append(1))
    full, early = GramCollector(model, names), GramCollector(model, names)
    collect_inputs(model, batches, full, stop_early=False)
    assert len(head_calls) == 3
    collect_inputs(model, batches, early)
    handle.remove()
    assert len(head_calls) == 3 + 1  # only the first batch ran to the LM head
    for name in names:
        assert early.tokens[name] == full.tokens[name] == 3 * 2 * 16
        torch.testing.assert_close(early.grams[name], full.grams[name], rtol=0, atol=0)
    assert not model.get_submodule(names[1])._forward_pre_hooks  # every hook removed
    out = model(batches[0]).logits  # and the model runs whole again
    assert out.shape == (2, 16, model.config.vocab_size)


def test_reconstruction_solves_the_normal_equations():
    from pruner.refit import compensate

    model = tiny_causal_lm("llama")
    s = discover(model)
    down = "model.layers.1.mlp.down_proj"
    collector = _down_proj_statistics(model, down)
    plan = Plan([pruner.LayerPlan(i, mlp_channels_kept=list(range(0, 96, 2)) if i == 1 else None) for i in range(3)])
    w = model.get_submodule(down).weight.detach().double().clone()
    refit = compensate(plan, s, model, collector, damping=1e-3)
    assert list(refit) == [f"{down}.weight"]
    assert torch.equal(model.get_submodule(down).weight.double(), w)  # computed, not yet applied
    g = collector.grams[down] / collector.tokens[down]
    kept = torch.arange(0, 96, 2)
    new = refit[f"{down}.weight"].double()  # (out, |K|): the pruned weight
    g_kk = g[kept][:, kept]
    lhs = new @ (g_kk + 1e-3 * g_kk.diagonal().mean() * torch.eye(48, dtype=torch.float64))
    torch.testing.assert_close(lhs, w @ g[:, kept] + 1e-3 * g_kk.diagonal().mean() * w[:, kept], rtol=1e-4, atol=1e-6)


def test_reconstruction_batches_replace_the_calibration_inputs_of_the_refit():
    batches = _batches(3)
    a, b = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    pruner.prune(a, batches, pruning_ratio=0.5, criterion="l2", reconstruct=True)
    plan = pruner.prune(b, [], pruning_ratio=0.5, criterion="l2", reconstruct=True, reconstruction_batches=batches)
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert plan.calibration["reconstruction_tokens"] == sum(x.numel() for x in batches)
    with pytest.raises(pruner.PrunerError, match="only used with reconstruct=True"):
        pruner.prune(tiny_causal_lm("llama"), batches, pruning_ratio=0.5, reconstruction_batches=batches)
    with pytest.raises(pruner.PrunerError, match="reconstruction_batches is empty"):
        pruner.prune(tiny_causal_lm("llama"), batches, pruning_ratio=0.5, reconstruct=True, reconstruction_batches=[])


def _refit_error(w: torch.Tensor, h: torch.Tensor, kept: torch.Tensor) -> float:
    """min over W'_K of tr((W - W') H (W - W')^T) with the removed columns of W' zero."""
    new = torch.zeros_like(w)
    new[:, kept] = torch.linalg.solve(h[kept][:, kept], (w @ h[:, kept]).T).T
    d = w - new
    return float((d @ h * d).sum())


def _obs_rechoice(dense, batches, plan, kind: str, damping: float):
    """What OBS selection makes of the score-chosen ``plan``, computed directly: the statistics of
    the dense model's inputs on ``batches`` (what prune's calibration passes collect), then
    select_mlp_obs / select_heads_obs, whose greedy choices the tests above check by brute force."""
    from pruner.refit import consumers, GramCollector, select_heads_obs, select_mlp_obs

    structure = discover(dense)
    collector = GramCollector(dense, consumers(structure))
    collector.attach()
    with torch.no_grad():
        for b in batches:
            dense(b)
    collector.detach()
    select = select_mlp_obs if kind == "mlp" else select_heads_obs
    return select(plan, structure, dense, collector, damping)

def test_obs_mlp_selection_is_the_greedy_least_refit_error_choice():
    from pruner.refit import select_mlp_obs

    model = tiny_causal_lm("llama", intermediate_size=48)
    s = discover(model)
    down = "model.layers.1.mlp.down_proj"
    collector = _down_proj_statistics(model, down)
    keep = list(range(4, 48))
    plan = Plan([pruner.LayerPlan(i, mlp_channels_kept=keep if i == 1 else None) for i in range(3)])
    chosen = select_mlp_obs(plan, s, model, collector, damping=0.1)
    assert plan.layers[1].mlp_channels_kept == keep  # the input plan is not changed
    assert len(chosen.layers[1].mlp_channels_kept) == 44
    # brute force: remove channels one at a time, each time the one whose removal leaves the least
    # error after refitting all the others (under the same ridge-regularised H)
    g = collector.grams[down] / collector.tokens[down]
    h = g + 0.1 * g.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    w = model.get_submodule(down).weight.detach().double()
    gone: list[int] = []
    for _ in range(4):
        errors = {j: _refit_error(w, h, torch.tensor([i for i in range(48) if i not in gone and i != j]))
                  for j in range(48) if j not in gone}
        gone.append(min(errors, key=errors.get))
    assert set(range(48)) - set(chosen.layers[1].mlp_channels_kept) == set(gone)
    assert chosen.layers[0].mlp_channels_kept is None and chosen.layers[2].mlp_channels_kept is None


def test_output_fisher_is_the_squared_loss_gradient_at_each_output():
    from pruner.refit import collect_output_fisher
    from pruner.refit import GramCollector

    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    batches = [torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))]
    collector = GramCollector(model, names)
    collect_output_fisher(model, batches, collector, max_samples=4)  # all of batch 0, one row of batch 1
    assert all(p.grad is None for p in model.parameters())  # gradients of the outputs only
    # the reference: the summed next-token loss of those 4 rows, backward, the outputs' gradients
    x = torch.cat([batches[0], batches[1][:1]])  # (4, 16)
    outputs = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o))
               for n in names]
    logits = model(x).logits
    handles[0].remove(), handles[1].remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    for name, grad in zip(names, grads):
        assert collector.fisher_tokens[name] == 4 * 16
        torch.testing.assert_close(collector.fisher[name], grad.double().square().sum((0, 1)), rtol=1e-4, atol=1e-12)
    assert collector.fisher[names[0]].gt(0).all()
    # every weight frozen (the graph starts at the embeddings' output): the same statistics
    frozen = GramCollector(model.requires_grad_(False), names)
    collect_output_fisher(model, batches, frozen, max_samples=4)
    for name in names:
        torch.testing.assert_close(frozen.fisher[name], collector.fisher[name], rtol=1e-6, atol=1e-12)
    assert not model(x).logits.requires_grad  # and no hook is left that would make it need a gradient


def test_fisher_weighted_obs_measures_the_error_in_the_loss_metric():
    from pruner.errors import PrunerError
    from pruner.refit import greedy_obs, select_mlp_obs

    model = tiny_causal_lm("llama", intermediate_size=48)
    s = discover(model)
    down = "model.layers.1.mlp.down_proj"
    collector = _down_proj_statistics(model, down)
    keep = list(range(0, 48, 2)) + [1, 3, 5]  # the plan's count: 27 of 48
    plan = Plan([pruner.LayerPlan(i, mlp_channels_kept=keep if i == 1 else None) for i in range(3)])
    out = model.get_submodule(down).out_features
    chosen = {}
    for tag, weights in {"uniform": torch.full((out,), 3.0), "row 5 only": torch.eye(out)[5] + 0.0}.items():
        collector.fisher, collector.fisher_tokens = {down: weights.double() * 10}, {down: 10}
        chosen[tag] = select_mlp_obs(plan, s, model, collector, damping=0.1, fisher_weighted=True).layers[1]
    unweighted = select_mlp_obs(plan, s, model, collector, damping=0.1).layers[1]
    # equal weights change nothing; all weight on one output: OBS of that output row alone
    assert chosen["uniform"].mlp_channels_kept == unweighted.mlp_channels_kept
    g = collector.grams[down] / collector.tokens[down]
    h_inv = torch.linalg.inv(g + 0.1 * g.diagonal().mean() * torch.eye(48, dtype=torch.float64))
    w = model.get_submodule(down).weight.detach().double()  # (out, 48): channel j is column j here
    alone = greedy_obs(h_inv, w[5:6].clone(), 48 - 27).nonzero().flatten().tolist()
    assert chosen["row 5 only"].mlp_channels_kept == alone != unweighted.mlp_channels_kept
    collector.fisher = {}
    with pytest.raises(PrunerError, match="no output Fisher statistics"):
        select_mlp_obs(plan, s, model, collector, damping=0.1, fisher_weighted=True)


def test_obs_fisher_needs_text_to_run_backward():
    from pruner.errors import PrunerError

    with pytest.raises(PrunerError, match="'obs-fisher' runs backward passes"):
        pruner.prune(tiny_causal_lm("llama"), [], pruning_ratio=0.2, criterion="l2", reconstruct=True,
                     mlp_selection="obs-fisher")


def test_obs_mlp_selection_keeps_the_counts_and_is_the_greedy_rechoice():
    torch.manual_seed(0)
    batches = _batches(4, 4, 32)
    dense = tiny_causal_lm("llama", num_hidden_layers=4, intermediate_size=128)
    plans = {}
    for selection in ("score", "obs"):
        plans[selection] = pruner.prune(copy.deepcopy(dense), batches, target_sparsity=0.3, prune_attention=False,
                                        reconstruct=True, mlp_selection=selection)
    score, obs = plans["score"], plans["obs"]
    assert obs.params == score.params and obs.settings["mlp_selection"] == "obs"
    sizes = [[len(lp.mlp_channels_kept or []) for lp in p.layers] for p in (score, obs)]
    assert sizes[0] == sizes[1]
    assert any(a.mlp_channels_kept != b.mlp_channels_kept for a, b in zip(score.layers, obs.layers))
    for lp in obs.layers:  # the per-group records follow the new choice
        flags = {r["index"]: r["removed"] for r in obs.group_records() if r["kind"] == "mlp_channel" and r["layer"] == lp.index}
        assert {i for i, gone in flags.items() if not gone} == set(lp.mlp_channels_kept)
    # prune(mlp_selection="obs") is the greedy OBS re-choice of the score plan, on the same statistics
    assert obs.layers == _obs_rechoice(dense, batches, score, "mlp", 0.1).layers


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_obs_head_selection_is_the_greedy_least_refit_error_choice(granularity):
    from pruner.refit import select_heads_obs

    # 6 query heads of 16: 2 KV groups of 3 (query: 2 heads leave every group) or 3 groups of 2 (kv: 2 groups go)
    n_kv = 2 if granularity == "query" else 3
    model = tiny_causal_lm("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=n_kv)
    s = discover(model)
    o_proj = "model.layers.1.self_attn.o_proj"
    collector = _down_proj_statistics(model, o_proj)
    if granularity == "query":
        layer = pruner.LayerPlan(1, heads_kept=[0, 3], kv_heads_kept=[0, 1])
    else:
        layer = pruner.LayerPlan(1, heads_kept=[0, 1], kv_heads_kept=[0])
    plan = Plan([pruner.LayerPlan(0), layer, pruner.LayerPlan(2)])
    chosen = select_heads_obs(plan, s, model, collector, damping=0.1).layers[1]
    assert plan.layers[1].heads_kept == layer.heads_kept  # the input plan is not changed
    # brute force, one unit at a time: the allowed unit whose removal leaves the least error after
    # refitting all other o_proj columns (under the same ridge-regularised H)
    g = collector.grams[o_proj] / collector.tokens[o_proj]
    h = g + 0.1 * g.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    w = model.get_submodule(o_proj).weight.detach().double()
    n_rep = 6 // n_kv
    units = [[u] for u in range(6)] if granularity == "query" else [list(range(k * 2, k * 2 + 2)) for k in range(3)]
    quota = {0: 2, 1: 2} if granularity == "query" else {"all": 2}
    group = (lambda u: u // n_rep) if granularity == "query" else (lambda u: "all")
    gone: list[int] = []
    while any(quota.values()):
        def error(u):
            cols = {c for v in gone + [u] for head in units[v] for c in range(head * 16, head * 16 + 16)}
            return _refit_error(w, h, torch.tensor([c for c in range(96) if c not in cols]))
        u = min((u for u in range(len(units)) if u not in gone and quota[group(u)]), key=error)
        gone.append(u)
        quota[group(u)] -= 1
    removed = {head for u in gone for head in units[u]}
    assert set(range(6)) - set(chosen.heads_kept) == removed
    if granularity == "query":  # GQA stays uniform: every group lost 2 of its 3 heads
        assert [sum(1 for hd in chosen.heads_kept if hd // 3 == k) for k in range(2)] == [1, 1]
        assert chosen.kv_heads_kept == [0, 1]
    else:
        assert chosen.kv_heads_kept == sorted(set(range(3)) - set(gone))


def test_obs_head_selection_keeps_the_counts_and_is_the_greedy_rechoice():
    batches = _batches(4, 4, 32)
    dense = tiny_causal_lm("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    plans = {}
    for selection in ("score", "obs"):
        plans[selection] = pruner.prune(copy.deepcopy(dense), batches, pruning_ratio=0.5, prune_mlp=False,
                                        reconstruct=True, reconstruct_damping=0.01, attention_selection=selection)
    score, obs = plans["score"], plans["obs"]
    assert obs.params == score.params and obs.settings["attention_selection"] == "obs"
    assert [len(lp.heads_kept) for lp in score.layers] == [len(lp.heads_kept) for lp in obs.layers]
    assert any(a.heads_kept != b.heads_kept for a, b in zip(score.layers, obs.layers))
    for lp in obs.layers:  # the per-group records follow the new choice
        flags = {r["index"]: r["removed"] for r in obs.group_records() if r["kind"] == "attention_head" and r["layer"] == lp.index}
        assert {i for i, gone in flags.items() if not gone} == set(lp.heads_kept)
    assert obs.layers == _obs_rechoice(dense, batches, score, "attention", 0.01).layers


@pytest.mark.parametrize("max_tokens", [12, 24, 36])
@pytest.mark.parametrize("criterion", ["element1", "vector"])
def test_micro_batched_backward_gives_the_whole_batch_scores(criterion, max_tokens):
    """Splitting a batch into micro-batches (the memory bound) must not change the scores, even
    when samples hold different numbers of labelled tokens (the loss is a token mean)."""
    model = tiny_causal_lm("llama")
    s = discover(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (5, 12), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # uneven labelled tokens per sample: naive chunk means would be wrong
    labels[3, 2:5] = -100
    batch = {"input_ids": ids, "labels": labels}
    cfg = PruneConfig(criterion=criterion, pruning_ratio=0.5)
    whole = estimate_importance(model, [batch], s, cfg, max_tokens_per_backward=None)
    split = estimate_importance(model, [batch], s, cfg, max_tokens_per_backward=max_tokens)
    assert whole.keys() == split.keys()
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-7)


def test_micro_batching_makes_the_same_plan_as_one_backward():
    model = tiny_causal_lm("llama")
    batches = [torch.cat(_batches(n=3, b=2, t=12, seed=5))]  # one batch of 6 samples
    kwargs = dict(criterion="element1", target_sparsity=0.25, attention_layers=(0, 2), mlp_layers=(0, 2))
    one = pruner.prune(copy.deepcopy(model), batches, max_tokens_per_backward=None, **kwargs)
    micro = pruner.prune(copy.deepcopy(model), batches, max_tokens_per_backward=12, **kwargs)
    assert one.layers == micro.layers
    assert one.params["removed"] > 0


def test_max_tokens_per_backward_is_checked_before_any_pass():
    model = tiny_causal_lm("llama")
    with pytest.raises(pruner.PrunerError, match="max_tokens_per_backward"):
        pruner.prune(model, _batches(), target_sparsity=0.2, max_tokens_per_backward=0)


def test_release_freed_memory_keeps_live_tensors_intact():
    from pruner.memory import release_freed_memory

    kept = torch.arange(1_000_000, dtype=torch.float32)
    expected = kept.clone()
    garbage = [torch.ones(2_000_000) for _ in range(4)]
    del garbage
    released = release_freed_memory()
    assert released in (True, False)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("mode", ["block", "channel"])
@pytest.mark.parametrize("criterion", ["element1", "vector"])
def test_direct_linear_sums_equal_autograd_sums(mode, criterion):
    """direct_linear forms each Linear weight's gradient sum as dy^T x in hooks; it must equal
    what autograd accumulates in .grad (weighted micro-batches, tied embeddings and norms in
    channel mode stay on the autograd path), leave no .grad and restore requires_grad."""
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)  # the user's own freezing must come back as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    s = discover(model)
    fams = families_for(s, PruneConfig(criterion=criterion, mode=mode, pruning_ratio=0.5))
    batches = _batches(n=2, b=2, t=12, seed=7)
    vectors = {}
    for direct in (False, True):
        est = ImportanceEstimator(model, fams, criterion, direct_linear=direct)
        est.attach()
        for i, batch in enumerate(batches):
            est.begin_batch(len(batch), weight=0.5 + i)  # uneven weights, as micro-batches have
            model(batch, labels=batch).loss.backward()
        est.detach()
        if direct:
            assert "model.layers.1.self_attn.q_proj.weight" in est._direct
            assert "model.embed_tokens.weight" not in est._direct  # tied with lm_head: autograd
        vectors[direct] = est.vectors()
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert vectors[False].keys() == vectors[True].keys()
    for key in vectors[False]:
        torch.testing.assert_close(vectors[True][key], vectors[False][key], rtol=1e-5, atol=1e-8)


def test_direct_linear_is_off_under_activation_checkpointing():
    model = tiny_causal_lm("llama")
    model.gradient_checkpointing_enable()
    fams = families_for(discover(model), PruneConfig(pruning_ratio=0.5))
    est = ImportanceEstimator(model, fams, "element1", direct_linear=True)
    est.attach()
    est.detach()
    assert est._direct == {}
