"""Importance criteria, aggregation and the estimator on tiny models, against hand computations."""

import copy

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.importance import ImportanceEstimator, aggregate, family_scores
from pruner.loop import estimate_importance, families_for
from pruner.structure import discover
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


@pytest.mark.parametrize("criterion", ["element1", "vector"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_one_backward_is_reduced_as_it_comes_with_the_same_scores_and_no_running_sums(criterion, arch):
    from pruner.loop import families_for

    model = tiny_causal_lm(arch)
    structure = discover(model)
    cfg = PruneConfig(pruning_ratio=0.5, criterion=criterion, mode="block")
    batch = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for one_pass in (False, True):
        est = ImportanceEstimator(model, families_for(structure, cfg), criterion, direct_linear=True,
                                  one_pass=one_pass)
        est.attach()
        est.begin_batch(4)
        model(input_ids=batch, labels=batch).loss.backward()
        est.detach()
        held = [k for k in est.state() if k.startswith("grad::")]
        assert bool(held) is not one_pass  # one_pass keeps no model-sized running sum
        results.append(est.vectors())
        if one_pass:
            with pytest.raises(PrunerError, match="a second calibration backward cannot be added"):
                est.begin_batch(4)
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])  # bit for bit
    # pruner.prune takes that path by itself for one batch in one backward: the plan of those scores
    from pruner.loop import make_plan
    from pruner.structure import count_parameters

    expected = make_plan(structure, results[0], cfg, count_parameters(model))
    one = pruner.prune(tiny_causal_lm(arch), [batch], pruning_ratio=0.5, criterion=criterion,
                       max_tokens_per_backward=None)
    assert one.layers == expected.layers
