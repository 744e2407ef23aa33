"""target_sparsity as a fraction of all parameters or of the decoder layers' (target_scope)."""

from __future__ import annotations

import warnings

import pytest
import torch

import pruner
from pruner.callbacks import StructuralPruneCallback
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm


def big_vocabulary_model():
    # embeddings 2 x 2000 x 64 = 256,000 of 440,768 parameters: a small model with a large vocabulary
    # (MLP 256 wide so that its channels alone can take over half of the layers)
    return tiny_causal_lm("llama", vocab_size=2000, intermediate_size=256)


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 2000, (2, 16), generator=g)]


@pytest.mark.parametrize("steps", [1, 2])
def test_layer_scope_removes_the_fraction_of_the_decoder_layers(steps):
    model = big_vocabulary_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gutting warning for a layer-scope target
        plan = pruner.prune(model, batches(), target_sparsity=0.3, target_scope="layers", iterative_steps=steps)
    p = plan.params
    layers = sum(q.numel() for q in model.model.layers.parameters())
    assert p["layers_after"] == layers and p["layers_before"] > layers
    assert abs(p["removed_layer_fraction"] - 0.3) < 0.02  # the granularity of one head or channel
    assert p["removed"] == p["layers_before"] - p["layers_after"]  # nothing outside the layers went
    assert p["removed_fraction"] < 0.15  # of all parameters: the embeddings are over half of them
    assert plan.settings["target_scope"] == "layers"


def test_a_model_scope_target_that_guts_the_layers_is_named():
    model = big_vocabulary_model()
    with pytest.warns(UserWarning, match=r"removed \d+% of the decoder layers.*target_scope='layers' with "
                                         r"target_sparsity=0\.\d\d"):
        plan = pruner.prune(model, batches(), target_sparsity=0.25)
    assert plan.params["removed_layer_fraction"] > 0.5 and abs(plan.params["removed_fraction"] - 0.25) < 0.01


def test_model_scope_on_a_model_of_mostly_layers_says_nothing():
    model = tiny_causal_lm("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = pruner.prune(model, batches_for(model), target_sparsity=0.2)
    assert plan.params["removed_layer_fraction"] < 0.5


def batches_for(model):
    return [torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("options, message", [
    (dict(pruning_ratio=0.2, target_scope="layers"), "target_scope='layers' says what target_sparsity is"),
    (dict(target_sparsity=0.2, target_scope="layers", mode="channel"), "mode='channel' shrinks the hidden size"),
    (dict(target_sparsity=0.2, target_scope="decoder"), "target_scope must be 'model'"),
])
def test_bad_scopes_are_refused_before_anything_runs(options, message):
    with pytest.raises(PrunerError, match=message):
        pruner.PruneConfig(**options)
    with pytest.raises(PrunerError, match=message):
        StructuralPruneCallback(**options)


def test_the_layer_scope_budget_error_names_the_layers():
    model = big_vocabulary_model()
    with pytest.raises(PrunerError, match=r"allow at most .* of the decoder layers"):
        pruner.prune(model, batches(), target_sparsity=0.9, target_scope="layers", mlp_layers=(0, 1),
                     attention_layers=(0, 1))
