"""Discovery and exact removal on tiny random models of every supported architecture."""

import copy

import pytest
import torch

import pruner
from pruner.structure import LayerPlan, Plan, apply_plan, discover, mask_plan
from pruner.testing import ARCHITECTURES, tiny_causal_lm


def _block_plan(s):
    layers = []
    for info in s.layers:
        a, m = info.attention, info.mlp
        n_rep = a.num_heads // a.num_kv_heads
        if n_rep > 1:  # drop one query head in every KV group
            heads = [h for h in range(a.num_heads) if h % n_rep != 1]
            kv = list(range(a.num_kv_heads))
        else:  # MHA: drop heads 1 and 3
            heads = kv = [0, 2]
        layers.append(LayerPlan(info.index, heads_kept=heads, kv_heads_kept=kv,
                                mlp_channels_kept=list(range(1, m.num_channels, 3))))
    return Plan(layers)


def _kv_plan(s):
    return Plan([LayerPlan(i.index, kv_heads_kept=[1]) for i in s.layers])


def _hidden_plan(s):
    return Plan([LayerPlan(i.index) for i in s.layers], hidden_kept=list(range(1, s.hidden_size, 2)))


def _layer_plan(s):
    return Plan([LayerPlan(i.index, removed=i.index == 1) for i in s.layers])


PLANS = {"block": _block_plan, "kv": _kv_plan, "hidden": _hidden_plan, "layer": _layer_plan}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_discovery_finds_heads_groups_and_channels(arch):
    model = tiny_causal_lm(arch)
    s = discover(model)
    assert len(s.layers) == 3 and s.hidden_size == 64
    for info in s.layers:
        a = info.attention
        assert (a.num_heads, a.head_dim, a.num_kv_heads) == (4, 16, 4 if arch == "llama_mha" else 2)
        assert info.mlp.num_channels == 96
        assert len(info.writers) == 2 and len(info.norms) == 2
    assert s.hidden_channel_problem is None


def test_gqa_heads_are_credited_to_their_own_kv_group():
    # the reference folds q-heads {h, h+n_kv, ...} onto KV head h; the real grouping is consecutive
    s = discover(tiny_causal_lm("llama"))
    kv = s.layers[0].attention.kv_groups
    q_rows = next(m for m in kv.members if m.param.endswith("q_proj.weight")).indices
    assert torch.equal(q_rows[0], torch.arange(0, 32)) and torch.equal(q_rows[1], torch.arange(32, 64))
    heads = s.layers[0].attention.heads
    assert [m.param.rsplit(".", 2)[-2] for m in heads.members] == ["q_proj", "o_proj"]  # k/v are shared


def test_fused_projections_split_into_their_parts():
    s = discover(tiny_causal_lm("phi3"))
    a, m = s.layers[0].attention, s.layers[0].mlp
    qkv = next(x for x in a.kv_groups.members if x.param.endswith("qkv_proj.weight")).indices
    # group 0: q rows 0..31, k rows 64..79, v rows 96..111 of the fused (64 + 32 + 32)-row weight
    assert qkv[0].tolist() == list(range(0, 32)) + list(range(64, 80)) + list(range(96, 112))
    gate_up = next(x for x in m.channels.members if x.param.endswith("gate_up_proj.weight")).indices
    assert gate_up[5].tolist() == [5, 96 + 5]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", list(PLANS))
def test_pruned_equals_masked(arch, kind):
    model = tiny_causal_lm(arch)
    s = discover(model)
    plan = PLANS[kind](s)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask_plan(plan, masked, s)
    apply_plan(plan, pruned, s)
    assert pruner.count_parameters(pruned) < pruner.count_parameters(model)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, atol=1e-5, rtol=1e-4)
    # and it differs from the dense model: the removal did something
    assert not torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-4)
    # generation with a KV cache follows the same path
    out_p = pruned.generate(ids[:1], max_new_tokens=5, do_sample=False)
    out_m = masked.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out_p, out_m)
    # and training works on the new shapes
    loss = pruned(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ratio_zero_is_identity(arch):
    model = tiny_causal_lm(arch)
    ref = copy.deepcopy(model)
    plan = Plan([LayerPlan(i) for i in range(3)])
    assert plan.is_identity
    apply_plan(plan, model)
    ids = torch.randint(3, 128, (1, 8))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=0, rtol=0)


def test_tied_embeddings_stay_tied_under_hidden_pruning():
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    s = discover(model)
    apply_plan(_hidden_plan(s), model, s)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (128, 32)


def test_plan_is_validated_before_any_weight_changes():
    model = tiny_causal_lm("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    bad = Plan([LayerPlan(0, heads_kept=[0], kv_heads_kept=[0, 1])] + [LayerPlan(i) for i in (1, 2)])
    with pytest.raises(pruner.PlanMismatchError, match="equally many"):
        apply_plan(bad, model)
    with pytest.raises(pruner.PlanMismatchError, match="layers"):
        apply_plan(Plan([LayerPlan(0)]), model)
    with pytest.raises(pruner.PlanMismatchError, match="out of range"):
        apply_plan(Plan([LayerPlan(0, mlp_channels_kept=[0, 500])] + [LayerPlan(i) for i in (1, 2)]), model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(pruner.UnsupportedArchitectureError, match="Conv1D"):
        discover(model)


def test_non_causal_lm_is_refused():
    from transformers import LlamaConfig, LlamaModel

    with pytest.raises(pruner.UnsupportedArchitectureError, match="lm_head|AutoModelForCausalLM"):
        discover(LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64)))
