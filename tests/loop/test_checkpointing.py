"""Activation checkpointing of the calibration backward (``activation_checkpointing=True``): the
same scores, statistics, plan and pruned weights as without it, on every family; the layers'
own forward back afterwards (also after a failure); and the backward keeps far fewer tensors."""

import copy

import pytest
import torch
from torch.testing import assert_close

import pruner
from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.loop import estimate_importance
from pruner.loop.calibration import checkpointed_layers
from pruner.refit import GramCollector, consumers
from pruner.structure import discover
from pruner.structure.layers import find_layer_stack
from pruner.testing import FAMILIES, tiny_causal_lm


def _batches(n=2, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (b, t), generator=g) for _ in range(n)]


def _vectors(model, cfg, checkpointing, max_tokens=None, collector=False):
    structure = discover(model)
    grams = GramCollector(model, consumers(structure)) if collector else None
    vectors = estimate_importance(model, _batches(), structure, cfg, collector=grams, max_tokens_per_backward=max_tokens,
                                  activation_checkpointing=checkpointing)
    return vectors, grams


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_scores_are_those_of_the_plain_backward_on_every_family(arch):
    model = tiny_causal_lm(arch, num_hidden_layers=3)
    cfg = PruneConfig(criterion="element1", pruning_ratio=0.5)
    plain, _ = _vectors(model, cfg, False)
    checkpointed, _ = _vectors(model, cfg, True)
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-7, msg=f"{arch}: {key}")


@pytest.mark.parametrize("criterion, max_tokens", [("element1", None), ("element1", 12), ("element2", None),
                                                   ("vector", None), ("mix", None), ("activation", None)])
def test_every_criterion_and_the_refit_statistics_see_each_token_once(criterion, max_tokens):
    # one backward (reduced as it comes), several (running sums), per-sample terms, forward-hook
    # statistics (the activation criterion, the refit's Grams): the recomputed forward adds nothing
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    cfg = PruneConfig(criterion=criterion, pruning_ratio=0.5)
    plain, plain_grams = _vectors(model, cfg, False, max_tokens, collector=True)
    checkpointed, grams = _vectors(model, cfg, True, max_tokens, collector=True)
    for key in plain:
        assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-7, msg=str(key))
    assert grams.tokens == plain_grams.tokens and grams.tokens
    for name in plain_grams.grams:
        assert_close(grams.grams[name], plain_grams.grams[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("options", [dict(target_sparsity=0.25), dict(target_sparsity=0.25, reconstruct=True,
                                                                      mlp_selection="obs", prune_attention=False)])
def test_prune_makes_the_same_plan_and_weights(options):
    dense = tiny_causal_lm("qwen2", num_hidden_layers=4, intermediate_size=128)
    plain, checkpointed = copy.deepcopy(dense), copy.deepcopy(dense)
    plan = pruner.prune(plain, _batches(), max_tokens_per_backward=None, **options)
    again = pruner.prune(checkpointed, _batches(), max_tokens_per_backward=None, activation_checkpointing=True,
                         **options)
    assert again.layers == plan.layers and not plan.is_identity
    for (name, p), (_, q) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_the_backward_keeps_a_fraction_of_the_activations():
    model = tiny_causal_lm("llama", num_hidden_layers=6, intermediate_size=256).eval()
    ids = torch.randint(3, 120, (4, 32))
    saved = []

    def kept_bytes(checkpointing: bool) -> int:
        saved.clear()
        pack = lambda t: saved.append(t.numel() * t.element_size()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with checkpointed_layers(model) if checkpointing else torch.enable_grad():
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(saved)

    plain, checkpointed = kept_bytes(False), kept_bytes(True)
    assert checkpointed < plain / 3, (plain, checkpointed)


def test_the_layers_get_their_own_forward_back_even_after_a_failure():
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    _, layers = find_layer_stack(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with checkpointed_layers(model):
        assert all("forward" in layer.__dict__ for layer in layers)
    assert all("forward" not in layer.__dict__ for layer in layers)


    def fail(module, args, output):
        raise RuntimeError("the second layer failed")

    layers[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="the second layer failed"):
        estimate_importance(model, _batches(), discover(model), PruneConfig(pruning_ratio=0.5),
                            activation_checkpointing=True)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_a_non_boolean_is_refused_before_any_work():
    with pytest.raises(PrunerError, match=r"activation_checkpointing='yes' must be True or False"):
        pruner.prune(tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5, activation_checkpointing="yes")
