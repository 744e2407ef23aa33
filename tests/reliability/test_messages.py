"""Messages that point the right way: each names the real cause (broken weights, not data; zero
weights, not an unused module; unmerged LoRA; code in a tokenizer folder) and NumPy numbers are
numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pruner
from pruner.errors import PrunerError
from pruner.recovery import LoraSettings, attach_lora
from pruner.testing import save_tiny_llama, tiny_causal_lm
from tests.helpers import tiny_batches


@pytest.mark.parametrize("criterion", ["element1", "element2", "l1", "l2", "activation", "random"])
def test_nan_weights_are_named_as_broken_weights_whatever_the_criterion(criterion):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[3, 1] = float("inf")
    before = {n: p.clone() for n, p in model.named_parameters()}
    batches = [b[:1] for b in tiny_batches(2)] if criterion == "element2" else tiny_batches(2)
    with pytest.raises(PrunerError, match=r"layers\.2\.self_attn\.o_proj\.weight holds NaN/inf values: the model "
                                          r"itself is broken.*load it again"):
        pruner.prune(model, batches, pruning_ratio=0.5, criterion=criterion)
    assert all(torch.equal(p, before[n]) or not torch.isfinite(p).all() for n, p in model.named_parameters())


def test_a_layer_of_zero_weights_prunes_instead_of_being_called_unused():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        for p in model.model.layers[1].mlp.parameters():
            p.zero_()
    plan = pruner.prune(model, tiny_batches(3), target_sparsity=0.2)
    zero_layer = next(g for g in plan.groups if g["kind"] == "mlp_channel" and g["layer"] == 1)
    assert set(zero_layer["scores"]) == {0.0} and sum(zero_layer["removed"]) > 0  # worthless channels went


def test_a_linear_the_layer_never_calls_is_named_before_any_weight_changes():
    model = tiny_causal_lm("llama")
    unused = model.model.layers[2].mlp
    model.model.layers[2].mlp = torch.nn.Identity()  # the layer skips its MLP ...
    model.model.layers[2].spare = unused  # ... which it still holds
    with pytest.raises(pruner.UnsupportedArchitectureError,
                       match=r"layers\.2\.spare\.\w+_proj is an nn\.Linear that model\.layers\.2's forward never calls"):
        pruner.prune(model, tiny_batches(), pruning_ratio=0.5)


@pytest.mark.parametrize("value", [np.float32(0.2), np.float64(0.2), np.array(0.2)[()]])
def test_numpy_numbers_are_numbers(value):
    config = pruner.PruneConfig(target_sparsity=value, iterative_steps=np.int64(1), seed=np.int32(3),
                                attention_layers=(np.int64(0), np.int64(2)))
    assert type(config.target_sparsity) is float and type(config.seed) is int
    assert config.attention_layers == (0, 2) and all(type(x) is int for x in config.attention_layers)
    json.dumps(config.to_dict())  # the plan's settings serialise
    plan = pruner.prune(tiny_causal_lm("llama"), tiny_batches(), target_sparsity=value, seed=np.int64(0))
    assert json.loads(plan.to_json())["settings"]["target_sparsity"] == pytest.approx(0.2)
    assert LoraSettings(r=np.int64(4), alpha=np.float32(8.0)).r == 4


def test_saving_with_lora_unmerged_says_merge_first(tmp_path):
    model = tiny_causal_lm("llama")
    attach_lora(model, LoraSettings(r=4))
    with pytest.raises(PrunerError, match=r"still holds LoRA adapters: merge them first \(pruner\.recovery\.merge_lora"):
        pruner.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_is_code_in_its_folder_is_named_as_such(tmp_path):
    from pruner.io import load_tokenizer

    folder = save_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(PrunerError, match=r"is code shipped in the folder \(tokenizer_config\.json maps AutoTokenizer"
                                          r".*trust_remote_code=True"):
        load_tokenizer(str(folder))
    with pytest.raises(PrunerError, match="code shipped in the folder"):
        pruner.load_model(str(folder))
    assert not marker.exists()
