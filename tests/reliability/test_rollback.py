"""Surgery is all or nothing: a failure at any point of any step leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

import pruner
from pruner.testing import tiny_causal_lm


def tiny_batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (1, 12), generator=g) for _ in range(n)]


def model_state(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({n: p.detach().clone() for n, p in model.state_dict().items()}, model.config.to_dict())


@pytest.mark.parametrize("where", ["_set_attention_sizes", "_remove_layers", "_shrink_hidden"])
def test_a_failure_in_the_middle_of_surgery_leaves_the_model_as_it_was(where, monkeypatch):
    import pruner.structure.surgery as surgery

    model = tiny_causal_lm("llama")
    weights, config = model_state(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    original = getattr(surgery, where)

    def fail_after(*args, **kw):
        original(*args, **kw)  # its changes are made, then the surgery breaks
        raise RuntimeError("injected failure")

    monkeypatch.setattr(surgery, where, fail_after)
    plan = pruner.Plan([pruner.LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1], mlp_channels_kept=list(range(48))),
                        pruner.LayerPlan(1, removed=True), pruner.LayerPlan(2)], hidden_kept=list(range(0, 64, 2)))
    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.apply_plan(plan, model)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert model.config.to_dict() == config and {n: type(m) for n, m in model.named_modules()} == modules
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert model.model.layers[0].mlp.down_proj.in_features == 96 and len(model.model.layers) == 3
    with torch.no_grad():  # and it still runs as the dense model
        assert model(input_ids=tiny_batches(1)[0]).logits.shape == (1, 12, 128)


def test_a_failing_second_step_undoes_the_first(monkeypatch):
    import pruner.loop.steps as pipeline

    model = tiny_causal_lm("llama")
    weights, _ = model_state(model)
    calls = []
    original = pipeline.make_plan

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step 2 failed")
        return original(*args, **kw)

    monkeypatch.setattr(pipeline, "make_plan", second_fails)
    with pytest.raises(RuntimeError, match="step 2 failed"):
        pruner.prune(model, tiny_batches(), target_sparsity=0.2, global_ranking=True, iterative_steps=2)
    assert len(calls) == 2 and model.model.layers[0].mlp.up_proj.out_features == 96
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())


def test_undo_keeps_only_what_was_removed_and_rebuilds_the_same_parameters():
    # tied embeddings sliced on the hidden dim, o_proj on both dims, down_proj refit: the old
    # Parameter objects stay (an optimizer may hold them) with their storage released until a
    # rollback rebuilds them bit for bit
    from pruner.structure import Transaction, apply_plan, discover

    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    weights, config = model_state(model)
    s = discover(model)
    before = dict(model.named_parameters())
    plan = pruner.Plan([pruner.LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1], mlp_channels_kept=list(range(48))),
                        pruner.LayerPlan(1), pruner.LayerPlan(2)], hidden_kept=list(range(0, 64, 2)))
    refit = {"model.layers.0.mlp.down_proj.weight": torch.randn(32, 48)}
    tx = Transaction()
    apply_plan(plan, model, s, refit=refit, transaction=tx)
    assert before["model.embed_tokens.weight"].numel() == 0 and before["model.layers.0.self_attn.o_proj.weight"].numel() == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (128, 32)
    tx.rollback()
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # the same objects
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.to_dict() == config
