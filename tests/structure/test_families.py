"""Every dense decoder family users prune, as tiny configs of transformers' own classes: what
discovery finds, exact removal in every mode the family allows (and a refusal naming the
reason where it does not), the whole pipeline, and the export. The README's family table is
these tests' summary."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import pruner
from pruner.structure import apply_plan, discover, mask_plan
from pruner.testing import FAMILIES, tiny_causal_lm
from tests.structure.test_exactness import PLANS

# why a mode is refused, per family (None: allowed and exact); anything not listed is allowed
CHANNEL_REFUSED = {
    "gemma": "scale by 1 \\+ weight", "gemma2": "scale by 1 \\+ weight", "gemma3_text": "scale by 1 \\+ weight",
    "granite": "embedding_multiplier", "gpt_neox": "is a LayerNorm", "falcon": "is a LayerNorm",
    "stablelm": "is a LayerNorm", "olmo": "no per-channel norm on the residual stream",
}
HEADS_COUPLED = {"olmo2", "olmo3"}  # q_norm / k_norm over the whole projection
# a uniform head count their config cannot describe (head size derived from hidden_size / heads)
DERIVED_HEAD_SIZE = {"gpt_neox", "falcon", "stablelm"}


def ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_discovery_finds_what_the_config_declares(family):
    model = tiny_causal_lm(family)
    s = discover(model)
    assert len(s.layers) == 3 and s.hidden_size == 64
    for info in s.layers:
        assert info.mlp is not None and info.mlp.num_channels == 96
        if family in HEADS_COUPLED:
            assert info.attention is None and "coupled" in info.attention_problem
            continue
        a = info.attention
        kv = model.config.num_attention_heads if family == "gpt_neox" else 2
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, kv, 16)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", list(PLANS))
def test_removal_equals_masking_or_is_refused_by_name(family, kind):
    model = tiny_causal_lm(family)
    s = discover(model)
    if kind == "hidden" and family in CHANNEL_REFUSED:
        before = {n: p.clone() for n, p in model.named_parameters()}
        with pytest.raises(pruner.UnsupportedArchitectureError, match=CHANNEL_REFUSED[family]):
            apply_plan(PLANS[kind](s), model, s)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        return
    if family in HEADS_COUPLED and kind in ("block", "kv"):
        pytest.skip("no attention family to plan with: tested by test_coupled_heads_prune_the_mlp_only")
    plan = PLANS[kind](s)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask_plan(plan, masked, s)
    apply_plan(plan, pruned, s)
    x = ids()
    torch.testing.assert_close(pruned(x).logits, masked(x).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pruned(x).logits, model(x).logits, atol=1e-4)
    out_p = pruned.generate(x[:1], max_new_tokens=5, do_sample=False)  # the KV cache follows the new shapes
    assert torch.equal(out_p, masked.generate(x[:1], max_new_tokens=5, do_sample=False))
    pruned.train()
    pruned(x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters() if p.requires_grad)


def test_coupled_heads_prune_the_mlp_only():
    model = tiny_causal_lm("olmo2")
    dense_heads = model.model.layers[0].self_attn.q_proj.weight.shape
    with pytest.warns(UserWarning, match="attention heads are coupled.*pruning MLP channels only"):
        plan = pruner.prune(model, [ids()], target_sparsity=0.2, target_scope="layers")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == dense_heads
    assert abs(plan.params["removed_layer_fraction"] - 0.2) < 0.02
    with pytest.raises(pruner.PrunerError, match="coupled.*prune_mlp=False nothing is left"):
        pruner.prune(tiny_causal_lm("olmo2"), [ids()], pruning_ratio=0.5, prune_mlp=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pipeline_prunes_refits_and_reloads(family, tmp_path):
    # the default selection, then OBS + least-squares refit + the regional fit, then the export
    model = tiny_causal_lm(family, num_hidden_layers=4, intermediate_size=128)
    dense = copy.deepcopy(model)
    text = [ids(i, (2, 16)) for i in range(3)]
    options = dict(target_sparsity=0.2, target_scope="layers", reconstruct=True, reconstruct_damping=0.01,
                   mlp_selection="obs", regional_epochs=1, reconstruction_batches=text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coupled-heads notice (olmo2)
        plan = pruner.prune(model, text[:1], **options)
    assert abs(plan.params["removed_layer_fraction"] - 0.2) < 0.05
    fit = plan.calibration.get("regional")
    assert fit["layers"] == list(range(4)) and sum(fit["error_after"]) <= sum(fit["error_before"])
    x = ids(7)
    logits = model(x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense(x).logits, atol=1e-4)
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    loaded = pruner.load_pretrained(folder)
    torch.testing.assert_close(loaded(x).logits, logits)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in HEADS_COUPLED])
def test_uniform_widths_load_without_remote_code_or_say_why_not(family, tmp_path):
    # hidden 64, 4 heads: keeping 3 (query granularity would keep 2: ask the KV groups) fails
    # transformers' "hidden size is not a multiple of the number of attention heads" validator
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(family, num_hidden_layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = pruner.prune(model, [ids()], pruning_ratio=0.5, uniform=True)
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)
    config = json.loads((folder / "config.json").read_text())
    x = ids(3)
    said = [str(w.message) for w in caught if "cannot describe" in str(w.message)]
    if family in DERIVED_HEAD_SIZE:  # said before surgery; per-layer widths through our loader
        assert said and "derives the head size" in said[0] and "pruner_shapes" in config
        torch.testing.assert_close(pruner.load_pretrained(folder)(x).logits, model(x).logits)
        return
    assert not said and "pruner_shapes" not in config, config.get("pruner_shapes")
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no remote code
    torch.testing.assert_close(plain(x).logits, model(x).logits)


def test_uniform_widths_a_config_refuses_fall_back_to_per_layer_widths(tmp_path):
    model = tiny_causal_lm("gemma3_text", num_hidden_layers=2, num_key_value_heads=4)
    with pytest.warns(UserWarning, match="keeps 3 attention heads.*Gemma3TextConfig cannot describe.*not a multiple"):
        plan = pruner.prune(model, [ids()], pruning_ratio=0.25, uniform=True, head_granularity="kv",
                            prune_mlp=False)
    assert model.model.layers[0].self_attn.q_proj.out_features == 48
    folder = pruner.save_pretrained(model, tmp_path / "out", plan=plan)  # was a StrictDataclassClassValidationError
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and "pruner_shapes" in config
    x = ids(3)
    torch.testing.assert_close(pruner.load_pretrained(folder)(x).logits, model(x).logits)
