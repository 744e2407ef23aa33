"""The layer-sequential refit of a sharded model without an unsharded copy of it: a meta copy of
the model whose decoder layers are gathered one at a time, when the refit walks them or the text
passes through them, and dropped again.

:class:`LayerWindow` holds the modules outside the decoder layers (its untied output layer
excepted: the refit never runs it) and, at any moment, the layer the walk is on plus one layer
a forward pass is crossing. The walk (:func:`pruner.refit.walk.refit_layer_by_layer`) holds
each layer it prunes or fits, then :meth:`LayerWindow.done` keeps this rank's part of the
layer's new weights (sharded along dim 0 over the dense model's mesh, as FSDP2 shards: 1/world of
a layer) and drops the layer. The pruned model is then the window's model, on the meta device
with the pruned widths, filled by :func:`pruner.distributed.sliced.fill_pruned` from
:attr:`LayerWindow.values` and the dense shards. The dense model never changes, so a failure
leaves nothing to undo.

On one process (plain tensors) the same steps run with whole tensors: the tests compare that
with the refit of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ..structure.layers import find_layer_stack
from .dtensor import device_mesh_of, local_tensor
from .gather import materialize, meta_copy


class LayerWindow:
    """A meta copy of ``dense`` (sharded or not) whose decoder layers are gathered on demand.
    Collective when ``dense`` is sharded: every rank runs the same passes in the same order."""

    def __init__(self, dense: nn.Module) -> None:
        self.dense = dense
        self.model = meta_copy(dense)
        self.layers_path, layers = find_layer_stack(self.model)
        self.values: dict[str, torch.Tensor] = {}  # pruned layers' new weights (this rank's shards)
        self._held: set[int] = set()
        self._mesh = device_mesh_of(dense)
        self.device = local_tensor(next(dense.parameters())).device  # the walk runs where the shards are
        self._dense_state = dense.state_dict(keep_vars=True)  # references (shards), read at every gather
        head = dense.get_output_embeddings()
        untied_head = head is not None and head.weight is not dense.get_input_embeddings().weight
        skip = f"{_module_name(dense, head)}." if untied_head else None
        state = self._full_state(lambda n: not n.startswith(self.layers_path + ".")
                                 and (skip is None or not n.startswith(skip)))
        materialize(self.model, state, dense, partial=True)
        moved: dict[int, torch.Tensor] = {}  # tied tensors stay one
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for attr, t in list(table.items()):
                    if t is not None and not t.is_meta and t.device != self.device:
                        if id(t) not in moved:
                            moved[id(t)] = (nn.Parameter(t.detach().to(self.device), requires_grad=t.requires_grad)
                                            if isinstance(t, nn.Parameter) else t.to(self.device))
                        table[attr] = moved[id(t)]
        self._handles = [h for i, layer in enumerate(layers)
                         for h in (layer.register_forward_pre_hook(self._enter_hook(i)),
                                   layer.register_forward_hook(self._leave_hook(i)))]

    # ------------------------------------------------------------------ what the walk calls

    def hold(self, index: int) -> None:
        """Gathers decoder layer ``index`` (if it is not here) and keeps it until :meth:`done`."""
        self._gather(index)
        self._held.add(index)

    def done(self, index: int, changed: bool) -> None:
        """The walk is finished with layer ``index``: with ``changed``, this rank's part of each of
        its weights goes to :attr:`values`; the layer goes back to the meta device (its widths stay)."""
        self._held.discard(index)
        if changed:
            for name, p in self._layer(index).named_parameters(prefix=f"{self.layers_path}.{index}"):
                self.values[name] = self._shard(p.detach())
        _to_meta(self._layer(index))

    @contextmanager
    def holding(self, index: int):
        """Layer ``index`` gathered for the duration (a check that runs it twice)."""
        self.hold(index)
        try:
            yield
        finally:
            self.done(index, changed=False)

    def close(self) -> nn.Module:
        """Every weight back on the meta device and the hooks removed; returns the pruned model's
        meta skeleton (what :func:`pruner.distributed.sliced.fill_pruned` fills)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _to_meta(self.model)
        return self.model

    # ------------------------------------------------------------------ gathering

    def _enter_hook(self, index: int):
        def enter(module, args):
            self._gather(index)
        return enter

    def _leave_hook(self, index: int):
        def leave(module, args, output):
            if index not in self._held:  # a layer the text only passes through
                _to_meta(self._layer(index))
        return leave

    def _layer(self, index: int) -> nn.Module:
        return self.model.get_submodule(f"{self.layers_path}.{index}")

    def _gather(self, index: int) -> None:
        layer = self._layer(index)
        if not any(p.is_meta for p in layer.parameters()):
            return
        prefix = f"{self.layers_path}.{index}."
        state = {n[len(prefix):]: t for n, t in self._full_state(lambda n: n.startswith(prefix)).items()}
        layer.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, p in layer.named_parameters() if p.is_meta]
        if still_meta:
            raise RuntimeError(f"layer {index}: no dense tensor for {still_meta[:3]}")

    def _full_state(self, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """The dense model's full tensors (parameters and persistent buffers) whose names are
        ``wanted``, gathered one at a time (collective for sharded ones)."""
        out = {}
        for name, t in self._dense_state.items():
            if wanted(name):
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                out[name] = full.detach().to(self.device, copy=True)
        return out

    def _shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 shard of ``full`` (equal on every rank) as a DTensor over the dense
        model's mesh, or ``full`` itself on one process."""
        if self._mesh is None:
            return full.clone()
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = [Replicate()] * (self._mesh.ndim - 1) + [Shard(0)]  # (HSDP: replicated, then sharded)
        shape, offset = compute_local_shape_and_global_offset(full.shape, self._mesh, placements)
        local = full.narrow(0, offset[0], shape[0]).clone()  # a copy: the full tensor is freed
        return DTensor.from_local(local, self._mesh, placements, run_check=False, shape=full.shape,
                                  stride=full.stride())


def _to_meta(module: nn.Module) -> None:
    """Every parameter of ``module`` on the meta device (shape and ``requires_grad`` kept)."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[attr] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
