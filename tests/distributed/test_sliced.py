"""The sharded prune step's pieces, on one process: a pruned model planned on the meta device and
filled tensor by tensor equals the one surgery makes of the whole model, for every family and
plan kind; discovery on the partial copy finds what it finds on the whole model; LoRA drawn
beside meta weights draws what it draws beside real ones. (The 2-process run against one process
is tests/callbacks/test_callback.py::test_fsdp2_two_processes_score_shards_and_match_one_process.)"""

from __future__ import annotations

import copy

import pytest
import torch

from pruner.distributed.gather import discovery_copy, meta_copy
from pruner.distributed.sliced import allocate, fill_pruned, parameters_made_by
from pruner.recovery.lora import LoraSettings, attach_lora
from pruner.structure import apply_plan, discover, find_layer_stack, probed_layers
from pruner.testing import FAMILIES, tiny_causal_lm
from tests.structure.test_exactness import PLANS
from tests.structure.test_families import CHANNEL_REFUSED, HEADS_COUPLED


def described(structure) -> list:
    """A structure as plain values (its families' members), for equality."""
    out = [structure.hidden_size, structure.final_norms, structure.tied_embeddings, structure.embedding, structure.lm_head,
           structure.hidden_channel_problem,
           {k: tuple(v) for k, v in structure.shapes.items()}]
    for info in structure.layers:
        families = [f for part in (info.attention, info.mlp) if part is not None
                    for f in ((part.heads, part.kv_groups) if part is info.attention else (part.channels,))]
        out.append((info.path, info.readers, info.writers, info.norms, info.attention_problem,
                    [(f.kind, [(m.param, m.dim, m.indices.tolist()) for m in f.members]) for f in families]))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", list(PLANS))
def test_a_meta_plan_filled_tensor_by_tensor_equals_surgery(family, kind):
    if (kind == "hidden" and family in CHANNEL_REFUSED) or (family in HEADS_COUPLED and kind in ("block", "kv")):
        pytest.skip("a plan this family refuses (tests/structure/test_families.py)")
    dense = tiny_causal_lm(family)
    structure = discover(dense)
    plan = PLANS[kind](structure)
    whole = copy.deepcopy(dense)
    apply_plan(plan, whole, structure)
    planned = meta_copy(dense)
    apply_plan(plan, planned, structure, check_fingerprint=False)
    allocate(planned, "cpu")
    fill_pruned(planned, dense, plan, structure)
    mine, theirs = dict(planned.named_parameters()), dict(whole.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine), [n for n in mine if not torch.equal(mine[n], theirs[n])]
    buffers = dict(whole.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in planned.named_buffers())
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(planned(ids).logits, whole(ids).logits)  # attributes and config as surgery sets them
    assert planned.config.to_dict() == whole.config.to_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3", "gpt_neox"])
def test_discovery_on_the_partial_copy_finds_the_whole_models_structure(family):
    dense = tiny_causal_lm(family)
    probe = discovery_copy(dense)
    assert described(discover(probe)) == described(discover(dense))
    real = {n for n, p in probe.named_parameters() if not p.is_meta}
    assert not any(".layers.1." in n or ".layers.2." in n for n in real)  # one layer of each shape
    assert any(".layers.0." in n for n in real)
    # only what discovery reads: an untied output layer stays on the meta device
    assert probe.get_output_embeddings().weight.is_meta != bool(dense.config.tie_word_embeddings)


def test_the_partial_copy_of_a_model_with_layers_of_different_widths_reaches_each_probed_layer():
    dense = tiny_causal_lm("llama")
    structure = discover(dense)
    plan = PLANS["block"](structure)
    plan.layers[2].mlp_channels_kept = list(range(64))  # layer 2 unlike 0 and 1: probed after layer 1 ran
    apply_plan(plan, dense, structure)
    probe = discovery_copy(dense)
    assert probed_layers(find_layer_stack(dense)[1]) == {0, 2}
    assert described(discover(probe)) == described(discover(dense))
    assert not any(p.is_meta for p in probe.model.layers[1].parameters())


def test_the_partial_copy_refuses_nan_weights_of_layers_it_does_not_keep():
    dense = tiny_causal_lm("llama")
    with torch.no_grad():
        dense.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="layers.2.mlp.down_proj.weight holds NaN"):
        discovery_copy(dense)


def test_lora_drawn_beside_meta_weights_equals_lora_drawn_beside_real_ones():
    dense = tiny_causal_lm("llama")
    structure = discover(dense)
    plan = PLANS["block"](structure)
    apply_plan(plan, dense, structure)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)

    def attach(model):
        torch.manual_seed(3)
        attach_lora(model, settings)

    planned = meta_copy(dense)
    made = parameters_made_by(planned, attach)
    attach(dense)
    real = {n: p for n, p in dense.named_parameters() if "lora_" in n}
    assert made.keys() == real.keys() and len(made) == 7 * 3 * 2
    # the same parameters train: LoRA's, not the (frozen) base weights
    trains = {n: p.requires_grad for n, p in dense.named_parameters()}
    assert {n: p.requires_grad for n, p in planned.named_parameters()} == trains
    assert all(p.is_meta for p in planned.parameters())
    assert all(torch.equal(made[n], real[n]) for n in made)
    assert any(bool(v.abs().sum()) for v in made.values())  # lora_A is drawn, not zero
