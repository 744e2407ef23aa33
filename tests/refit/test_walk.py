"""The layer-by-layer refit gives the plans and weights of the whole-model refit it replaced
(``tests/refit/reference.py``), while holding one layer's statistics at a time."""

from __future__ import annotations

import pytest
import torch

import pruner
from pruner.config import PruneConfig
from pruner.refit import statistics
from pruner.testing import tiny_causal_lm

from .reference import reference_prune

OPTIONS = {
    "mlp-obs": dict(target_sparsity=0.2, reconstruct=True, mlp_selection="obs"),
    "heads-obs": dict(pruning_ratio=0.5, reconstruct=True, attention_selection="obs"),
    "obs-fisher-regional": dict(target_sparsity=0.2, reconstruct=True, mlp_selection="obs-fisher", regional_epochs=1),
    "local-mlp-regional": dict(pruning_ratio=0.3, prune_attention=False, mlp_layers=(1, 3), reconstruct=True,
                               regional_epochs=2),
    "score-refit": dict(pruning_ratio=0.5, reconstruct=True, reconstruct_damping=0.01),
}


def _batches(n: int, shape: tuple[int, int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("with_text", [True, False], ids=["reconstruction-text", "calibration-text"])
def test_the_layer_walk_equals_the_whole_model_refit(arch, name, with_text):
    calibration = _batches(2, (2, 16), 0)
    text = _batches(3, (4, 24), 1) if with_text else None
    options = OPTIONS[name]
    expected_model = tiny_causal_lm(arch)
    expected = reference_prune(expected_model, calibration, PruneConfig(**options), text)
    model = tiny_causal_lm(arch)
    plan = pruner.prune(model, calibration, reconstruction_batches=text, **options)
    assert plan.layers == expected.layers
    reference = expected_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    if "regional" in expected.calibration:
        for key in ("layers", "error_before", "error_after"):
            assert plan.calibration["regional"][key] == expected.calibration["regional"][key]


def test_the_walk_gathers_each_layers_statistics_alone(monkeypatch):
    live = []
    original_init = statistics.GramCollector.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        live.append(self)

    monkeypatch.setattr(statistics.GramCollector, "__init__", tracking_init)
    model = tiny_causal_lm("llama")
    pruner.prune(model, _batches(2, (2, 16), 0), target_sparsity=0.2, reconstruct=True, mlp_selection="obs",
                 reconstruction_batches=_batches(2, (4, 24), 1))
    with_grams = [c for c in live if c.grams]
    assert len(with_grams) == 3  # one collector per pruned layer ...
    for c in with_grams:  # ... holding that layer's consumers alone
        layers = {name.split(".")[2] for name in c.grams}  # model.layers.<i>.mlp.down_proj
        assert len(layers) == 1, sorted(c.grams)
