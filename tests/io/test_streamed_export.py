"""Exports written as their tensors come (FSDP2's export gathers one decoder layer at a time on
rank 0): the same files as transformers' own writer, in shards with an index when asked, and
LoRA merged unit by unit equal to LoRA merged in the whole model. (Two processes against one:
tests/callbacks/test_callback.py::test_fsdp2_two_processes_score_shards_and_match_one_process.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import pruner
from pruner.callbacks.export import merged_weights
from pruner.distributed.gather import build_skeleton, meta_copy
from pruner.io.shards import INDEX, WEIGHTS, write_weights
from pruner.recovery.lora import LoraSettings, attach_lora, merge_lora
from pruner.structure import apply_plan, discover
from pruner.testing import tiny_causal_lm
from tests.structure.test_exactness import PLANS


def pruned(family: str):
    model = tiny_causal_lm(family)
    structure = discover(model)
    apply_plan(PLANS["layer" if family == "olmo2" else "block"](structure), model, structure)
    return model


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt_neox", "phi3", "olmo2"])
def test_weights_written_as_they_come_equal_the_transformers_export(family, tmp_path):
    model = pruned(family)
    ordinary = pruner.save_pretrained(model, tmp_path / "ordinary")
    streamed = pruner.save_pretrained(meta_copy(model), tmp_path / "streamed",
                                      weights=iter(model.state_dict().items()))
    assert sorted(p.name for p in ordinary.iterdir()) == sorted(p.name for p in streamed.iterdir())
    for name in ("config.json", "generation_config.json"):
        if (ordinary / name).is_file():
            assert json.loads((ordinary / name).read_text()) == json.loads((streamed / name).read_text()), name
    a, b = tensors(ordinary), tensors(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pruner.load_pretrained(streamed)(ids).logits, model(ids).logits)


def test_shards_and_their_index_load_like_one_file(tmp_path):
    model = pruned("llama")
    folder = pruner.save_pretrained(model, tmp_path / "export")
    (folder / WEIGHTS).unlink()
    files = write_weights(model, model.state_dict().items(), folder, max_shard_bytes=50_000)
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    index = json.loads((folder / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pruner.load_pretrained(folder)(ids).logits, model(ids).logits)


def test_a_tensor_that_never_comes_is_refused(tmp_path):
    model = pruned("llama")
    partial = [(k, v) for k, v in model.state_dict().items() if "layers.1." not in k]
    with pytest.raises(pruner.PrunerError, match="no weights came for .*layers.1"):
        pruner.save_pretrained(meta_copy(model), tmp_path / "export", weights=iter(partial))
    assert not (tmp_path / "export").exists()  # nothing half-written


@pytest.mark.parametrize("targets", [None, ("q_proj", "down_proj", "lm_head")])
def test_lora_merged_unit_by_unit_equals_lora_merged_in_the_whole_model(targets):
    model = pruned("llama")
    skeleton = build_skeleton(model)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, **({"target_modules": targets} if targets else {}))
    torch.manual_seed(0)
    attach_lora(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # trained adapters: the merge changes the weights
    whole = copy.deepcopy(model)
    merge_lora(whole)
    streamed = dict(merged_weights(model, skeleton, settings, keep=True))
    expected = whole.state_dict()
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"],
                           model.model.layers[0].self_attn.q_proj.base_layer.weight)
