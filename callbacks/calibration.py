"""Calibration batches inside ``fit``: the user's ``training_step`` and backward run as usual,
but no weight moves, whatever optimizers the module configured.

:class:`PausedOptimizers` makes each optimizer's ``step`` run only its closure (Lightning's
closure is the training step, the backward and the gradient hooks), so neither an update nor
weight decay nor a momentum buffer changes; the importance estimator's gradient hooks have
already consumed and freed every gradient by then. Lightning still counts each batch in
``global_step`` and steps ``interval: step`` LR schedulers after it; both optimizers and
schedulers are rebuilt from ``configure_optimizers`` at the prune step, so recovery starts with
fresh optimizer state at the start of its schedule.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([w], lr=1.0, momentum=0.9, weight_decay=0.1)
    >>> paused = PausedOptimizers([opt])
    >>> def closure():
    ...     w.grad = torch.ones(2)
    ...     return 0.0
    >>> _ = opt.step(closure); w.tolist()
    [1.0, 1.0]
    >>> paused.resume(); _ = opt.step(closure); [round(x, 4) for x in w.tolist()]  # 1 - (1 + 0.1 * 1)
    [-0.1, -0.1]
"""

from __future__ import annotations

from typing import Any

import torch

from pruner.errors import PrunerError


class PausedOptimizers:
    """Replaces ``optimizer.step`` of each given optimizer by "run the closure, update nothing"
    until :meth:`resume`."""

    def __init__(self, optimizers) -> None:
        self._paused: list[torch.optim.Optimizer] = []
        for opt in optimizers:
            if "step" in vars(opt):  # already paused (or patched by someone else): leave it
                continue
            opt.step = _closure_only(opt)
            self._paused.append(opt)

    def resume(self) -> None:
        for opt in self._paused:
            if "step" in vars(opt):
                del opt.step  # the class's own step again
        self._paused.clear()


def _closure_only(optimizer: torch.optim.Optimizer):
    def step(closure=None, **kwargs):
        # torch's LR schedulers warn when they step before their optimizer ever did
        optimizer._opt_called = True
        return closure() if closure is not None else None

    return step


def batch_samples(batch: Any) -> int:
    """How many samples a train batch holds (the loss averages over them): ``input_ids``'s first
    dimension in a dict batch, else the first tensor's first dimension."""
    if isinstance(batch, dict):
        tensor = batch.get("input_ids")
        if tensor is None:
            tensor = next((v for v in batch.values() if torch.is_tensor(v)), None)
    elif isinstance(batch, (list, tuple)):
        tensor = next((v for v in batch if torch.is_tensor(v)), None)
    else:
        tensor = batch if torch.is_tensor(batch) else None
    if tensor is None or tensor.dim() == 0:
        raise PrunerError(f"cannot tell how many samples a calibration batch of type {type(batch).__name__} holds: "
                          "use dict batches with 'input_ids' (B, T), tensors or tuples of tensors")
    return int(tensor.shape[0]) if tensor.dim() >= 2 else 1


def model_inputs(batch: Any) -> dict[str, torch.Tensor] | None:
    """The ``input_ids`` / ``attention_mask`` / ``labels`` of a dict batch (CPU copies), or None
    when the batch is not such a dict."""
    if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")):
        return None
    return {k: batch[k].detach().cpu() for k in ("input_ids", "attention_mask", "labels")
            if torch.is_tensor(batch.get(k))}
