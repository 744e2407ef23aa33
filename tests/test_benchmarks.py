"""The benchmark scripts' named allocations mean what their names say, whatever the library's
defaults: ``global_ranking``/``head_granularity`` default to None and resolve by the target, which
once turned every "local" row of ``benchmarks/prune_quality.py`` into a global one unnoticed."""

import importlib.util
from pathlib import Path

import pytest

from pruner.config import PruneConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prune_quality = _load("prune_quality")


@pytest.mark.parametrize("name", sorted(prune_quality.ALLOCATIONS))
def test_prune_quality_allocations_resolve_as_named(name):
    # the script's base: the target and the layers, the allocation's fields on top
    base = PruneConfig(criterion="element1", target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28))
    cfg = prune_quality.allocation_config(base, name)
    kind = name.split("-")[0]
    assert cfg.global_ranking is (kind == "global")
    if name.endswith("-query"):
        assert cfg.head_granularity == "query" and cfg.prune_attention
    if "-kv" in name:
        assert cfg.head_granularity == "kv" and cfg.prune_attention
    if name.endswith("-mlp"):
        assert not cfg.prune_attention and cfg.prune_mlp
    if kind == "ratio":
        assert (cfg.target_sparsity, cfg.pruning_ratio) == (None, 0.33)
