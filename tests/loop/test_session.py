"""PruneSession: one prune, driven by pruner.prune (the session runs the batches) or by a
recording driver (the caller runs them, as the Lightning callback does), with the same result."""

from __future__ import annotations

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.loop import PruneSession, calibration_reruns
from pruner.testing import tiny_causal_lm


def _batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (2, 16), generator=g) for _ in range(n)]


def _record(session: PruneSession, model, batches) -> None:
    """What a driver does per calibration batch: record, then its own forward and backward."""
    for ids in batches:
        session.record({"input_ids": ids, "labels": ids}, samples=ids.shape[0])
        model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("options", [dict(target_sparsity=0.2), dict(pruning_ratio=0.5, criterion="vector"),
                                     dict(pruning_ratio=0.5, iterative_steps=2, prune_attention=False),
                                     dict(target_sparsity=0.2, reconstruct=True, mlp_selection="obs")])
def test_a_recording_driver_prunes_like_pruner_prune(options):
    batches = _batches()
    reference = tiny_causal_lm("llama")
    expected = pruner.prune(reference, batches, **options)
    model = tiny_causal_lm("llama")
    session = PruneSession(model, PruneConfig(**options))
    session.start_recording(model)
    _record(session, model, batches)
    plan = session.prune(model)
    assert plan.layers == expected.layers and plan.params == expected.params
    assert plan.calibration == expected.calibration
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_session_resumed_from_its_state_in_the_middle_of_calibration_gives_the_same_plan():
    batches = _batches(6)
    cfg = dict(pruning_ratio=0.5, reconstruct=True, iterative_steps=2, prune_attention=False)
    model = tiny_causal_lm("llama")
    whole = PruneSession(model, PruneConfig(**cfg))
    whole.start_recording(model)
    _record(whole, model, batches)
    expected = whole.prune(model)

    model = tiny_causal_lm("llama")
    first = PruneSession(model, PruneConfig(**cfg))
    first.start_recording(model)
    _record(first, model, batches[:3])
    state = first.state_dict()
    assert state["calibrated_batches"] == 3 and len(state["calibration_inputs"]) == 3  # iterative: kept
    first.pause()
    model = tiny_causal_lm("llama")  # a fresh process: the dense model again
    second = PruneSession(model, PruneConfig(**cfg))
    second.load_state_dict(state)
    second.start_recording(model)
    _record(second, model, batches[3:])
    plan = second.prune(model)
    assert plan.layers == expected.layers and plan.calibration == expected.calibration


def test_validation_paused_recording_does_not_count():
    batches = _batches(3)
    model = tiny_causal_lm("llama")
    session = PruneSession(model, PruneConfig(pruning_ratio=0.5))
    session.start_recording(model)
    _record(session, model, batches[:2])
    session.pause()
    model(input_ids=batches[2], labels=batches[2]).loss.backward()  # e.g. a validation pass with gradients
    session.resume()
    paused = session.prune(model)
    other = tiny_causal_lm("llama")
    assert paused.layers == pruner.prune(other, batches[:2], pruning_ratio=0.5).layers


def test_calibration_is_kept_only_where_the_prune_step_reruns_it():
    assert calibration_reruns(PruneConfig(pruning_ratio=0.5)) is None
    assert calibration_reruns(PruneConfig(pruning_ratio=0.5, attention_selection="measured")) is not None
    fisher = PruneConfig(pruning_ratio=0.5, reconstruct=True, mlp_selection="obs-fisher")
    assert calibration_reruns(fisher, has_text=False) is not None and calibration_reruns(fisher, has_text=True) is None
    model = tiny_causal_lm("llama")
    session = PruneSession(model, PruneConfig(pruning_ratio=0.5))
    session.start_recording(model)
    _record(session, model, _batches(2))
    assert session.state_dict().get("calibration_inputs") == []
