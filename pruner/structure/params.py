"""A model's parameters: counted (tied weights once) and fingerprinted (which dense model a plan fits).

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> count_parameters(tiny_causal_lm("llama"))
    108992
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..checks import check_model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (shared tensors) are counted once."""
    check_model(model)
    # model.parameters() already de-duplicates shared Parameters (tied embeddings).
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_fingerprint(model) -> str:
    """A cheap, deterministic fingerprint of a model: parameter names, shapes and the first
    values of each, rounded to bfloat16 so that the same weights in fp32, bf16 or fp16 agree.
    A model sharded by FSDP2 gets its unsharded copy's fingerprint (collective, every rank must
    call it: the first values come from the shards, :func:`first_values`)."""
    named = list(model.named_parameters())
    firsts = first_values(named)
    h = hashlib.sha256()
    for name, p in named:
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(firsts[name].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def first_values(named: list[tuple[str, torch.Tensor]], count: int = 8) -> dict[str, torch.Tensor]:
    """The first ``count`` values (flat order) of each full tensor, in its dtype. DTensors sharded
    along dim 0 only (FSDP2) give theirs from the shards: each rank sends the first values of its
    own shard with their position, one all-gather for every tensor together, instead of gathering
    each tensor whole (under HSDP, over the mesh dimension that shards; replicas hold the same
    values). Other DTensors are gathered. Collective when any tensor is a DTensor."""
    out, sharded = {}, []
    mesh_dim = None  # the one mesh dimension that shards dim 0 (FSDP2: 0; HSDP: the last)
    for name, t in named:
        mesh = getattr(t, "device_mesh", None)
        shards = [i for i, pl in enumerate(t.placements) if pl.is_shard()] if mesh is not None else []
        if mesh is None or not shards:  # plain or replicated everywhere: the values are here
            out[name] = (t.to_local() if mesh is not None else t).detach().reshape(-1)[:count]
        elif (len(shards) == 1 and t.placements[shards[0]].is_shard(0) and mesh_dim in (None, shards[0])
              and (not sharded or mesh == sharded[0][1].device_mesh)):  # one all-gather: one mesh, one dim
            mesh_dim = shards[0]
            sharded.append((name, t))
        else:
            out[name] = t.full_tensor().detach().reshape(-1)[:count]
    if not sharded:
        return out
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    # per tensor: [flat position of this shard's first value, how many it sends, the values...]
    mine = torch.zeros(len(sharded), 2 + count, dtype=torch.float64, device=sharded[0][1].to_local().device)
    for i, (_, t) in enumerate(sharded):
        local = t.to_local().detach().reshape(-1)[:count]
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        row = t.shape[1:].numel() if t.ndim > 1 else 1
        mine[i, 0], mine[i, 1] = offset[0] * row if t.ndim else 0, local.numel()
        mine[i, 2: 2 + local.numel()] = local.double()
    group = sharded[0][1].device_mesh.get_group(mesh_dim)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)  # (ranks) x (tensors, 2 + count)
    for i, (name, t) in enumerate(sharded):
        pieces = sorted(((int(r[i, 0]), r[i, 2: 2 + int(r[i, 1])]) for r in every if r[i, 1] > 0),
                        key=lambda piece: piece[0])
        values, end = [], 0
        for start, piece in pieces:  # contiguous shards: each starts where the one before ends
            if start <= end < start + len(piece):
                values.append(piece[end - start:])
                end = start + len(piece)
        flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        out[name] = flat[: min(count, t.numel())].to(t.dtype)
    return out
