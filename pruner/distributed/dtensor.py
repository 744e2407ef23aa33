"""DTensor helpers (FSDP2 / tensor parallel): whether a model is sharded, a rank's shard of a
tensor, and where that shard sits in the full tensor. Plain ``torch.distributed``, no Lightning.

Example:
    >>> import torch
    >>> local_tensor(torch.ones(2)).tolist(), shard_offset(torch.ones(2), 0)
    ([1.0, 1.0], None)
    >>> local_part(torch.arange(4.0), torch.ones(4)).tolist()  # not sharded: the whole tensor
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import torch
from torch import nn


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by FSDP2 or tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def shard_offset(t: torch.Tensor, dim: int) -> int | None:
    """Where this rank's shard of ``t`` starts along ``dim`` in the full tensor; None when ``dim``
    is not sharded (the shard then holds the whole extent of ``dim``)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not any(isinstance(p, Shard) and p.dim == dim for p in t.placements):
        return None
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[dim])


def device_mesh_of(model: nn.Module):
    """The device mesh of ``model``'s first DTensor parameter (the mesh FSDP2 sharded it over),
    None for a model without DTensors."""
    return next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)


def replica_count(t: torch.Tensor) -> int:
    """How many ranks hold the same shard of ``t``: the sizes of the mesh dimensions along which
    the DTensor is replicated (HSDP's replicate dimension), 1 for a plain tensor or plain FSDP2."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return 1
    count = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            count *= t.device_mesh.size(dim)
    return count


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's block of the full tensor ``full``, laid out as the DTensor ``like`` is (its
    shape and placements): what ``like.to_local()`` holds once ``like`` equals ``full``. A plain
    ``like``: ``full`` itself."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} for a DTensor of shape {tuple(like.shape)}")
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    for dim, (size, start) in enumerate(zip(shape, offset)):
        full = full.narrow(dim, start, size)  # (local shape) block of the full tensor
    return full


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` itself."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(module, FSDPModule)
