"""Distributed plumbing of ``StructuralPruneCallback``, all through ``trainer.strategy``.

* :func:`all_reduce_dict`: sums a dict of tensors over ranks, one flat all-reduce per dtype;
* :func:`check_ranks_agree`: every rank learns whether any rank chose another plan;
* :func:`unwrap_ddp` / :func:`rebuild_training`: calibration on the bare module, then a new
  ``DistributedDataParallel`` wrapper and new optimizers for the pruned (+ LoRA) parameters;
* :func:`shard_causal_lm` / :func:`reshard`: FSDP2 (``fully_shard``) of a pruned model, per decoder
  layer and root, or the module's own ``shard_model()``;
* :func:`strategy_ranks`: the strategy's collectives as a :class:`pruner.loop.Ranks` for the session;
* :func:`gather_reason` / :func:`install_sharded`: FSDP2's prune step, slicing each rank's shards
  (:mod:`pruner.distributed.sliced`) unless a setting needs the whole dense model.

Single-device strategies make all of these no-ops (their ``reduce`` returns its input).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> one_process = SimpleNamespace(reduce=lambda t, reduce_op="sum": t)
    >>> all_reduce_dict(one_process, {"a": torch.ones(2), "n": torch.tensor(3.0)})["n"].item()
    3.0
"""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import torch
from torch import nn

from pruner.distributed import device_mesh_of, local_tensor
from pruner.distributed.sliced import allocate, fill_pruned
from pruner.errors import PrunerError
from pruner.io.models import replace_submodule
from pruner.loop import Ranks
from pruner.structure import find_layer_stack


def all_reduce_dict(strategy, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` summed over ranks (same keys and shapes on every rank): the tensors of each
    dtype are flattened into one vector and all-reduced once, then split back."""
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in sorted(tensors):
        by_dtype.setdefault(tensors[key].dtype, []).append(key)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        keys = by_dtype[dtype]
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys])
        flat = strategy.reduce(flat, reduce_op="sum")
        for k, piece in zip(keys, torch.split(flat, [tensors[k].numel() for k in keys])):
            out[k] = piece.reshape(tensors[k].shape)
    return out


def check_ranks_agree(trainer: pl.Trainer, plan) -> None:
    """Raises on EVERY rank when any rank's ``plan`` differs from rank 0's (a rank that went on
    alone would hang at the next collective)."""
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()
    reference = trainer.strategy.broadcast(digest, src=0)
    disagree = trainer.strategy.reduce(torch.tensor(float(digest != reference)), reduce_op="sum")
    if float(disagree) > 0:
        raise PrunerError(
            f"ranks disagree on the pruning plan ({int(float(disagree))} of {trainer.world_size} differ from "
            "rank 0): the models or importance scores differ between ranks; check that every rank loads "
            "the same weights and that selection is deterministic"
        )


def unwrap_ddp(trainer: pl.Trainer) -> None:
    """Calibration runs on the bare module: DDP would average the gradients (the callback wants
    each rank's own sum, all-reduced once at the prune step) and its reducer expects gradients
    for parameters the importance estimator freezes. :func:`rebuild_training` re-wraps it."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(trainer.strategy.model, DistributedDataParallel):
        trainer.strategy.model = trainer.lightning_module


def rebuild_training(trainer: pl.Trainer) -> None:
    """New parameters need new optimizers and schedulers (from the module's own
    ``configure_optimizers``) and, under DDP, a new wrapper (its reducer holds the old
    parameter list; its constructor also checks that every rank has the same shapes)."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)


def data_parallel_mesh(pl_module: pl.LightningModule):
    """The mesh FSDP2 shards over: the ``data_parallel`` dimension of the module's device mesh."""
    mesh = pl_module.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise PrunerError(
            f"tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) is not supported by "
            "StructuralPruneCallback: use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_causal_lm(model: nn.Module, layers_path: str, mesh) -> None:
    """FSDP2 over ``mesh``: every decoder layer, then the whole model (embeddings, norm, head):
    the layout Lightning's FSDP2 examples use, applied to the pruned model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_submodule(layers_path):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def strategy_ranks(trainer: pl.Trainer, device: torch.device) -> Ranks:
    """The strategy's sums over ranks, as the prune session takes them (identity on one device)."""
    return Ranks(world_size=trainer.world_size, reduce=lambda tensors: all_reduce_dict(trainer.strategy, tensors),
                 all_reduce=lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu())


def reshard(pl_module: pl.LightningModule, model: nn.Module, dense: nn.Module) -> None:
    """FSDP2 of the pruned ``model``: the module's own ``shard_model()`` if it has one, else per
    decoder layer + root on the mesh the module sharded ``dense`` over (a 2-D mesh stays HSDP:
    replicated along its first dimension, sharded along its second)."""
    shard = getattr(pl_module, "shard_model", None)
    if callable(shard):
        shard()
        return
    mesh = device_mesh_of(dense)
    shard_causal_lm(model, find_layer_stack(model)[0], mesh if mesh is not None else data_parallel_mesh(pl_module))


def gather_reason(copies_teacher: bool) -> str | None:
    """Why FSDP2's prune step must gather an unsharded copy of the model on every rank (None:
    the ranks slice their own shards, :mod:`pruner.distributed.sliced`, and the refit of
    ``reconstruct`` gathers one decoder layer at a time, :mod:`pruner.distributed.window`): a
    distillation teacher that is a copy of the dense model (see :func:`teacher_in_place`)."""
    if copies_teacher:
        return ("the module keeps its distillation teacher as a copy of the dense model (its keep_teacher takes no "
                "copy=False, or its teacher_dtype is not the model's dtype)")
    return None


def install_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, pruned: nn.Module,
                    dense: nn.Module, sliced: tuple | None) -> None:
    """FSDP2: the pruned model in the module at ``path`` in place of ``dense``, sharded and on the
    device. ``pruned`` is an unsharded copy with its weights, or (``sliced = (plan, structure,
    lora values)``) planned on the meta device: each rank then writes its own shards from the
    dense shards. On any error the dense model is put back."""
    replace_submodule(pl_module, path, pruned)
    try:
        reshard(pl_module, pruned, dense)
        if sliced is not None:
            plan, structure, values = sliced
            allocate(pruned, local_tensor(next(dense.parameters())).device)
            fill_pruned(pruned, dense, plan, structure, values)
        trainer.strategy.model_to_device()
    except BaseException:
        replace_submodule(pl_module, path, dense)
        raise
