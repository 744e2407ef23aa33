"""Regional reconstruction (``regional_epochs``): what the fit learns, its statistics pass, its checks and rollback."""

import copy

import pytest
import torch
from torch.testing import assert_close

import pruner
from pruner.errors import PrunerError
from pruner.refit import GramCollector, collect_inputs, regional
from pruner.structure import discover
from pruner.testing import tiny_causal_lm

COMMON = dict(pruning_ratio=0.5, prune_attention=False, reconstruct=True, reconstruct_damping=0.01)


def _text(n=6, b=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (b, t), generator=g) for _ in range(n)]


@torch.no_grad()
def _layer_outputs(model, batches):
    """(tokens, d) per decoder layer: the stream after each layer on ``batches``."""
    states = [model(input_ids=b, output_hidden_states=True).hidden_states[1:] for b in batches]
    return [torch.cat([s[i].reshape(-1, s[i].shape[-1]) for s in states]) for i in range(len(states[0]))]


def _relative(a, b):
    return float((a - b).square().sum() / b.square().sum())


def test_the_fit_brings_each_pruned_layers_output_back_towards_the_dense_one():
    text = _text()
    dense = tiny_causal_lm("llama")
    target = _layer_outputs(dense, text)
    refit_only, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    plan_a = pruner.prune(refit_only, text[:2], reconstruction_batches=text, **COMMON)
    plan_b = pruner.prune(fitted, text[:2], reconstruction_batches=text, regional_epochs=8, regional_lr=3e-3, **COMMON)
    assert plan_a.to_dict()["layers"] == plan_b.to_dict()["layers"]  # the same channels go; only weights differ
    assert "regional" not in plan_a.calibration
    report = plan_b.calibration["regional"]
    assert report["layers"] == [0, 1, 2] and report["epochs"] == 8
    assert all(after < before for before, after in zip(report["error_before"], report["error_after"]))
    # on the model itself: every layer's output is nearer the dense stream than with the refit alone
    worse = _layer_outputs(refit_only, text)
    better = _layer_outputs(fitted, text)
    for i in range(3):
        assert _relative(better[i], target[i]) < 0.9 * _relative(worse[i], target[i]), i
    # the fit changed the MLPs only (attention and norms as the refit left them), with the same shapes
    a, b = refit_only.state_dict(), fitted.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".mlp." in k for k in changed), sorted(changed)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "falcon"])
def test_the_report_errors_are_what_the_layer_outputs_show(family):
    """The first fitted layer sees the dense stream, so its reported error after the fit is
    measurable from outside: ||out - dense out||² / ||dense out - residual||², the residual being
    the layer's output with its MLP's output zeroed; whatever the layer does to that output (Gemma
    2: a norm after it; Granite: a multiplier; Falcon: the attention added to it in place)."""
    text = _text()
    dense = tiny_causal_lm(family)
    target = _layer_outputs(dense, text)[0]
    fitted = copy.deepcopy(dense)
    report = pruner.prune(fitted, text[:2], reconstruction_batches=text, regional_epochs=2, **COMMON).calibration["regional"]
    out = _layer_outputs(fitted, text)[0]
    mlp = fitted.get_submodule(discover(dense).layers[0].mlp.module)
    hook = mlp.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    residual = _layer_outputs(fitted, text)[0]  # (tokens, d) the stream the layer adds its MLP's share to
    hook.remove()
    expected = float((out - target).square().sum() / (target - residual).square().sum())
    assert report["error_after"][0] == pytest.approx(expected, rel=1e-3)
    assert report["error_after"][0] < report["error_before"][0]


def test_the_statistics_pass_records_every_batchs_layer_outputs_past_its_early_stop():
    model = tiny_causal_lm("llama")
    text = _text(n=3)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    collector = GramCollector(model, names, ["model.layers.0", "model.layers.1"])
    collect_inputs(model, text, collector)  # stops early after the first batch: after layer 1's output here
    expected = _layer_outputs(model, text)
    for i in range(2):
        got = collector.outputs[f"model.layers.{i}"]
        assert [tuple(o.shape) for o in got] == [(4, 32, 64)] * 3
        assert_close(torch.cat([o.reshape(-1, 64) for o in got]), expected[i])
    assert collector.tokens[names[1]] == 3 * 4 * 32


def test_padding_tokens_are_left_out_of_the_fit():
    text = _text(n=4)
    masks = [torch.ones_like(b) for b in text]
    for m in masks:
        m[:, 24:] = 0  # right padding: the last 8 tokens of every sample
    batches = [{"input_ids": b, "attention_mask": m} for b, m in zip(text, masks)]
    seen = []
    original = regional.fit_mlp

    def spy(mlp, x, target, *args, **kwargs):
        seen.append(len(x))
        return original(mlp, x, target, *args, **kwargs)

    model = tiny_causal_lm("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(regional, "fit_mlp", spy)
        plan = pruner.prune(model, batches[:2], reconstruction_batches=batches, regional_epochs=1, **COMMON)
    assert seen == [4 * 4 * 24] * 3  # the unpadded tokens of each fitted layer
    assert len(plan.calibration["regional"]["layers"]) == 3


def test_calibration_batches_feed_the_fit_when_there_is_no_reconstruction_text():
    model = tiny_causal_lm("llama")
    before = copy.deepcopy(model)
    plan = pruner.prune(model, _text(n=3), criterion="element2", regional_epochs=1, **COMMON)  # per-sample passes
    report = plan.calibration["regional"]
    assert report["layers"] == [0, 1, 2]
    assert all(after <= b for b, after in zip(report["error_before"], report["error_after"]))
    assert model.model.layers[0].mlp.up_proj.out_features == before.model.layers[0].mlp.up_proj.out_features // 2


def test_only_the_layers_in_the_pruned_ranges_are_fitted_and_the_stream_passes_the_others():
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    dense = copy.deepcopy(model)
    text = _text()
    plan = pruner.prune(model, text[:2], reconstruction_batches=text, regional_epochs=1, mlp_layers=(1, 2),
                        attention_layers=(3, 4), **{**COMMON, "prune_attention": True})
    assert plan.calibration["regional"]["layers"] == [1, 3]  # layer 2 carried the stream, unfitted
    for i in (0, 2):  # outside every range: untouched
        for name, p in dense.model.layers[i].named_parameters():
            assert torch.equal(p, model.model.layers[i].get_parameter(name)), (i, name)


def test_a_failure_in_the_fit_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = regional.fit_mlp

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second layer")
        return original(*args, **kwargs)

    monkeypatch.setattr(regional, "fit_mlp", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="second layer"):
        pruner.prune(model, _text()[:2], reconstruction_batches=_text(), regional_epochs=1, **COMMON)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # shapes and values: the first layer's fitted MLP and the surgery are undone
        assert torch.equal(after[k], before[k]), k
    assert model.model.layers[0].mlp.up_proj.out_features == 96


def test_a_fit_that_would_raise_the_error_is_not_kept():
    text = _text()
    plain, wild = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    pruner.prune(plain, text[:2], reconstruction_batches=text, **COMMON)
    report = pruner.prune(wild, text[:2], reconstruction_batches=text, regional_epochs=1, regional_lr=10.0,
                          **COMMON).calibration["regional"]  # steps of about 10 per weight: far worse
    assert report["layers"] == [0, 1, 2] and report["error_after"] == report["error_before"]
    assert_close(wild.state_dict(), plain.state_dict(), rtol=0, atol=0)  # every MLP as the refit left it


def test_a_layer_with_a_norm_after_its_residual_sum_is_refused_before_anything_changes():
    model = tiny_causal_lm("llama")
    for layer in model.model.layers:  # output = norm(residual + MLP output): no target for the MLP alone
        norm, forward = copy.deepcopy(layer.input_layernorm), layer.forward
        layer.forward = lambda *args, _norm=norm, _forward=forward, **kwargs: _norm(_forward(*args, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunerError, match="residual stream plus a multiple of their MLP's output .*; model.layers.0 "
                                          "is not .*set regional_epochs=0"):
        pruner.prune(model, _text()[:2], reconstruction_batches=_text(), regional_epochs=1, **COMMON)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family, branch", [
    ("phi3", regional.MlpBranch()),  # fused gate_up: the MLP's output added as it is
    ("gemma2", regional.MlpBranch(post="post_feedforward_layernorm")),
    ("glm4", regional.MlpBranch(post="post_mlp_layernorm")),
    ("olmo2", regional.MlpBranch(post="post_feedforward_layernorm")),
    ("granite", regional.MlpBranch(scale=0.5)),  # residual_multiplier=0.5 in tiny_causal_lm
    ("falcon", regional.MlpBranch()),  # the attention added to the MLP's output in place
    ("gpt_neox", regional.MlpBranch()),  # post_mlp_dropout: the identity here
])
def test_what_a_layer_does_to_its_mlps_output_is_read_from_the_layer(family, branch):
    model = tiny_causal_lm(family)
    assert regional.mlp_branch(model, discover(model), 1, {"input_ids": _text()[0]}) == branch


@pytest.mark.parametrize("options, message", [
    (dict(regional_epochs=2, reconstruct=False), "set reconstruct=True"),
    (dict(regional_epochs=2, iterative_steps=2), "use iterative_steps=1"),
    (dict(regional_epochs=-1), "regional_epochs must be"),
    (dict(regional_epochs=1.5), "regional_epochs must be"),
    (dict(regional_epochs=1, regional_lr=0.0), "regional_lr must be"),
    (dict(regional_epochs=1, regional_lr=float("nan")), "regional_lr must be"),
])
def test_bad_regional_settings_are_refused_with_the_fix(options, message):
    model = tiny_causal_lm("llama")
    with pytest.raises(PrunerError, match=message):
        pruner.prune(model, _text()[:2], **{**COMMON, **options})


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3"])
def test_other_architectures_fit_too(arch):
    model = tiny_causal_lm(arch)
    text = _text()
    plan = pruner.prune(model, text[:2], reconstruction_batches=text, regional_epochs=2, **COMMON)
    report = plan.calibration["regional"]
    assert report["layers"] == [0, 1, 2]
    assert sum(report["error_after"]) < sum(report["error_before"])


def test_a_model_left_in_train_mode_is_fitted_without_dropout():
    text = _text()
    results = []
    for seed in (0, 1):  # dropout would draw different masks under different seeds
        model = tiny_causal_lm("llama", attention_dropout=0.5).train()
        torch.manual_seed(seed)
        plan = pruner.prune(model, text[:2], reconstruction_batches=text, regional_epochs=1, **COMMON)
        assert model.training  # left as it was
        results.append((plan.calibration["regional"]["error_after"], model.state_dict()))
    assert results[0][0] == results[1][0]
    assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_a_bfloat16_model_is_fitted_in_fp32_and_keeps_its_dtype():
    text = _text()
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    plan = pruner.prune(model, text[:2], reconstruction_batches=text, regional_epochs=2, **COMMON)
    report = plan.calibration["regional"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert report["layers"] == [0, 1, 2] and sum(report["error_after"]) < sum(report["error_before"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=text[0]).logits).all()
