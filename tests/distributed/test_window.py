"""The layer-sequential refit on a copy gathered one decoder layer at a time
(:class:`pruner.distributed.window.LayerWindow`), on one process: the walked layers' new weights
plus the dense weights sliced by the plan are the model that the refit of the whole model makes,
and the dense model does not change. (2 processes under FSDP2 against one:
tests/callbacks/test_callback.py, the reconstruct test with every whole-model gather an error.)"""

from __future__ import annotations

import copy

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.distributed.sliced import allocate, fill_pruned
from pruner.distributed.window import LayerWindow
from pruner.loop import PruneSession
from pruner.testing import tiny_causal_lm
from tests.helpers import tiny_batches

SETTINGS = {
    "obs+refit": dict(pruning_ratio=0.5, reconstruct=True, mlp_selection="obs"),
    "obs heads+regional": dict(pruning_ratio=0.5, reconstruct=True, attention_selection="obs", mlp_selection="obs",
                               regional_epochs=1, mlp_layers=(1, 3), attention_layers=(1, 3)),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_windowed_walk_gives_the_whole_models_plan_and_weights(family, setting):
    options = SETTINGS[setting]
    dense = tiny_causal_lm(family)
    calibration, text = tiny_batches(2, seed=0, shape=(2, 12)), tiny_batches(3, seed=1, shape=(2, 16))
    whole = copy.deepcopy(dense)
    kept = {n: p.detach().clone() for n, p in dense.named_parameters()}
    windows: list[LayerWindow] = []

    def window(model):
        windows.append(LayerWindow(model))
        return windows[-1]

    sessions = [recorded_session(m, PruneConfig(**options), calibration, text) for m in (whole, dense)]
    reference = sessions[0].prune(whole)  # in place, as on one device
    plan = sessions[1].prune(dense, window=window)
    assert plan.layers == reference.layers
    skeleton = sessions[1].model
    assert all(p.is_meta for p in skeleton.parameters())  # the copy holds nothing once the walk is done
    assert windows[0].values and all(".layers." in n for n in windows[0].values)
    allocate(skeleton, "cpu")
    fill_pruned(skeleton, dense, plan, sessions[1].structure, windows[0].values)
    mine, theirs = dict(skeleton.named_parameters()), dict(whole.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine), [n for n in mine if not torch.equal(mine[n], theirs[n])]
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(skeleton(ids).logits, whole(ids).logits)
    assert all(torch.equal(p, kept[n]) for n, p in dense.named_parameters())  # the dense model is untouched


def recorded_session(model, cfg: PruneConfig, calibration: list[torch.Tensor], text: list[torch.Tensor]):
    """A session that recorded importance over ``calibration``'s backward passes, as the callback's does."""
    session = PruneSession(model, cfg)
    session.start_recording(model, [{"input_ids": b} for b in text])
    for ids in calibration:
        session.record({"input_ids": ids}, ids.shape[0])
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return session


def test_a_window_needs_recorded_importance():
    model = tiny_causal_lm("llama")
    session = PruneSession(model, PruneConfig(pruning_ratio=0.5, reconstruct=True),
                           calibration_batches=[{"input_ids": b} for b in tiny_batches(1)])
    with pytest.raises(pruner.PrunerError, match="recorded on the dense model"):
        session.prune(model, window=LayerWindow)
