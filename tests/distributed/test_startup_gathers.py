"""FSDP2's start-up on 2 CPU processes (gloo): the fingerprint and the NaN/inf check read the shards,
so only what discovery probes is gathered; the fingerprint is the unsharded model's, and a broken
weight in one rank's shard is refused on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, init_file: str, out: str, poison: bool, mesh_shape: tuple[int, ...]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from pruner.distributed.gather import discovery_copy
    from pruner.errors import PrunerError
    from pruner.structure.params import first_values, model_fingerprint
    from pruner.testing import tiny_causal_lm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        names = ("replicate", "shard")[-len(mesh_shape):]
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)  # 2-D: HSDP's, replicate then shard
        placements = [Replicate()] * (len(mesh_shape) - 1) + [Shard(0)]
        # shards of uneven sizes, and first values spread over both ranks
        five = distribute_tensor(torch.arange(1.0, 6.0), mesh, placements)  # rank 0: 3 values, rank 1: 2
        rows = distribute_tensor(torch.arange(1.0, 7.0).reshape(3, 2), mesh, placements)  # 2 rows / 1 row
        firsts = first_values([("five", five), ("rows", rows)])
        result["firsts"] = {k: v.tolist() for k, v in firsts.items()}

        model = tiny_causal_lm("llama")  # seeded: the same weights on both ranks
        result["unsharded"] = model_fingerprint(model)
        if poison:  # the last row of an unprobed layer's weight: in rank 1's shard only
            with torch.no_grad():
                model.model.layers[2].mlp.up_proj.weight[-1, -1] = float("nan")
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gathered: list[int] = []
        full_tensor = DTensor.full_tensor

        def counted(self, *args, **kwargs):
            gathered.append(self.numel())
            return full_tensor(self, *args, **kwargs)

        DTensor.full_tensor = counted
        try:
            result["sharded"] = model_fingerprint(model)
            result["fingerprint_gathered"] = sum(gathered)
            discovery_copy(model)
        except PrunerError as err:
            result["error"] = str(err)
        finally:
            DTensor.full_tensor = full_tensor
        result["gathered"] = sum(gathered)
        result["weights"] = sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _run(tmp_path: Path, poison: bool, mesh_shape: tuple[int, ...] = (WORLD,)) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), poison, mesh_shape), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(WORLD,), (1, WORLD), (WORLD, 1)], ids=["fsdp2", "hsdp", "hsdp-replicas"])
def test_start_up_gathers_only_what_discovery_probes_and_fingerprints_the_whole_model(tmp_path, mesh_shape):
    r0, r1 = _run(tmp_path, poison=False, mesh_shape=mesh_shape)
    assert r0["firsts"] == r1["firsts"] == {"five": [1.0, 2.0, 3.0, 4.0, 5.0], "rows": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    assert r0["sharded"] == r1["sharded"] == r0["unsharded"]
    assert r0["fingerprint_gathered"] == 0  # every parameter is sharded along dim 0: no tensor gathered
    # discovery gathers the embedding, the first layer and the final norm: under half of 3 layers' model
    assert 0 < r0["gathered"] == r1["gathered"] < r0["weights"] / 2, (r0["gathered"], r0["weights"])
    assert "error" not in r0


@pytest.mark.slow
def test_a_broken_weight_in_one_ranks_shard_is_refused_on_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, poison=True)
    for r in (r0, r1):
        assert "model.layers.2.mlp.up_proj.weight holds NaN/inf" in r["error"], r
