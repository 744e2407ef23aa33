"""The refit's statistics, the least-squares refit and Optimal Brain Surgeon selection, against hand computations."""

import copy

import pytest
import torch

import pruner
from pruner.structure import Plan, discover
from pruner.testing import tiny_causal_lm


def _batches(n=3, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (b, t), generator=g) for _ in range(n)]


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


def test_the_gram_formed_a_block_of_rows_at_a_time_is_the_sum_of_the_whole_products(monkeypatch):
    # blocks that do not divide the width (96 = 2 x 40 + 16): every row once, the same values to the bit
    from pruner.refit import GramCollector, statistics

    monkeypatch.setattr(statistics, "GRAM_ROWS", 40)
    model = tiny_causal_lm("llama")
    down = "model.layers.1.mlp.down_proj"
    inputs = []
    handle = model.get_submodule(down).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    collector = GramCollector(model, [down])
    collector.attach()
    with torch.no_grad():
        for batch in _batches(3, 4, 32):  # three products summed
            model(batch)
    collector.detach()
    handle.remove()
    whole = sum((x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1])).double() for x in inputs)
    assert collector.grams[down].shape == (96, 96) and len(inputs) > 1
    assert torch.equal(collector.grams[down], whole)


def test_the_obs_inverse_is_that_of_the_damped_mean_gram():
    from pruner.refit.obs import _obs_start

    model = tiny_causal_lm("llama")
    down = "model.layers.1.mlp.down_proj"
    collector = _down_proj_statistics(model, down)
    cols = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    h_inv, w = _obs_start(model, collector, down, 0.1, cols)
    gram = collector.grams[down][cols.unsqueeze(1), cols] / collector.tokens[down]
    h = gram + 0.1 * gram.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    torch.testing.assert_close(h_inv, torch.linalg.inv(h), rtol=1e-9, atol=1e-12 * float(h_inv.abs().max()))
    assert torch.equal(w, model.get_submodule(down).weight.detach().double()[:, cols])


def test_collect_inputs_stops_each_forward_at_its_last_consumer_with_the_same_statistics():
    from pruner.refit import GramCollector, collect_inputs

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
    from pruner.refit import GramCollector, consumers, select_heads_obs, select_mlp_obs

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
    from pruner.refit import GramCollector, collect_output_fisher

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

    with pytest.raises(PrunerError, match="reconstruct=True refits on the inputs of the pruned layers, but no batch"):
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
