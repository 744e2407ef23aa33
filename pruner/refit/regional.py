"""Regional reconstruction: after the surgery, each pruned layer's MLP is trained alone so that
the pruned layer gives the dense layer's output again (``regional_epochs``; no loss on the
model's output, no labels).

The layers are walked in order on the pruned model's own hidden states. Layer ``l``'s MLP
learns the target ``y* = h_dense[l+1] - r[l]``: the dense stream after the layer (recorded
during the refit's statistics pass) minus the pruned stream entering the MLP (``r`` = the
layer's output minus what its MLP adds). So each MLP makes up not only for its own lost
channels but for the drift the pruned layers before it left in the stream. What the MLP adds,
``f(x)``, is its output as the layer passes it on: through a norm in Gemma 2/3, GLM-4 and OLMo 2/3
(e.g. ``post_feedforward_layernorm``), times Granite's ``residual_multiplier``; :func:`mlp_branch`
reads which from the layer before anything changes, and refuses a layer whose output is not the
stream plus such a term. The error is relative: ``mean ||f(x) - y*||² / mean ||y*||²`` over the
refit's tokens, minimised by AdamW in batches of :data:`BATCH_TOKENS` tokens on an fp32 copy of
the MLP (the norm fixed); the fitted weights replace the MLP's only where they lower that error
over all tokens.

What it gains, and the variants tried (targets without the drift term, the whole layer fitted):
docs/results.md, "Regional reconstruction after the one-shot prune".

Example:
    >>> import torch
    >>> import pruner
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> text = [torch.randint(3, 120, (4, 32)) for _ in range(4)]
    >>> plan = pruner.prune(model, text[:2], pruning_ratio=0.5, prune_attention=False, reconstruct=True,
    ...                     reconstruction_batches=text, regional_epochs=2)
    >>> fit = plan.calibration["regional"]  # the relative error of each fitted layer, before and after
    >>> fit["layers"], all(a <= b for a, b in zip(fit["error_after"], fit["error_before"]))
    ([0, 1, 2], True)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import PrunerError
from ..structure import ModelStructure, Transaction

# Tokens per AdamW step: on SmolLM2, 2 epochs at 1e-3 in batches of 512 tokens of the 32,768 (128
# steps a layer) gave 96.7 on seed 0; more epochs or a higher rate saturated (parallel variants
# 98.5-99.4 over 2-8 epochs, 1e-3 to 3e-3).
BATCH_TOKENS = 512

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks


class _StopForward(Exception):
    """Raised by the hook that ends a forward pass once a layer's inputs are captured."""


def fitted_layers(structure: ModelStructure, cfg: PruneConfig) -> list[int]:
    """The layers whose MLP the fit trains: every layer with an MLP whose heads or MLP
    channels ``cfg`` may prune.

    Example:
        >>> from pruner.structure import discover
        >>> from pruner.testing import tiny_causal_lm
        >>> fitted_layers(discover(tiny_causal_lm("llama")), PruneConfig(pruning_ratio=0.5, mlp_layers=(1, 3)))
        [0, 1, 2]
    """
    return [info.index for info in structure.layers if info.mlp is not None
            and (cfg.prunes("attention", info.index) or cfg.prunes("mlp", info.index))]


def target_modules(structure: ModelStructure, cfg: PruneConfig) -> list[str]:
    """The decoder layers whose dense outputs the fit needs (recorded by
    :class:`~pruner.refit.statistics.GramCollector` during the refit's statistics pass)."""
    return [structure.layers[i].path for i in fitted_layers(structure, cfg)]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layer: nn.Module, batches: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """``(hidden_states, kwargs)`` with which ``model``'s forward pass calls ``layer``, one per
    batch (the causal mask, rotary embeddings, ... as the model builds them); the forward pass
    stops there."""
    captured = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _StopForward

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    if len(captured) != len(batches):
        raise PrunerError("regional reconstruction: the model's forward pass did not reach every pruned layer")
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, mlp: nn.Module, hidden: torch.Tensor, kwargs: dict,
              replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
              watch: dict[str, nn.Module] | None = None, called: list[str] | None = None):
    """``layer``'s output on ``hidden`` with its MLP's input and output: ``(out, x, y)``. The
    layer goes on with a copy of ``y`` (a layer that adds to its MLP's output in place, as Falcon's
    does, leaves ``y`` as the MLP gave it), or with ``replace(y)`` when given. ``watch``:
    ``{name: module}`` of the layer; the names of those the layer calls on that copy are
    appended to ``called`` (the module after the MLP, :func:`mlp_branch`)."""
    seen = {}

    def pre(module, args):
        seen["x"] = args[0]

    def post(module, args, out):
        seen["y"] = out
        seen["passed"] = replace(out) if replace is not None else out.clone()
        return seen["passed"]

    def watcher(name: str):
        def hook(module, args, kwargs):
            given = args[0] if args else next(iter(kwargs.values()), None)
            if "passed" in seen and given is seen["passed"]:
                called.append(name)
        return hook

    handles = [mlp.register_forward_pre_hook(pre), mlp.register_forward_hook(post)]
    handles += [m.register_forward_pre_hook(watcher(n), with_kwargs=True) for n, m in (watch or {}).items()]
    try:
        out = _first(layer(hidden, **kwargs))
    finally:
        for h in handles:
            h.remove()
    if "x" not in seen:
        raise PrunerError("regional reconstruction: a decoder layer did not call its MLP")
    return out, seen["x"], seen["y"]


@dataclass(frozen=True)
class MlpBranch:
    """What a decoder layer adds to its residual stream from its MLP's output ``y``:
    ``scale * post(y)``. ``post``: the name, inside the layer, of the module the layer passes
    ``y`` to (Gemma 2's ``post_feedforward_layernorm``; None: ``y`` itself); ``scale``: a constant
    factor (Granite's ``residual_multiplier``; 1 elsewhere).

    Example:
        >>> MlpBranch(scale=0.5).apply(None, torch.ones(2)).tolist()
        [0.5, 0.5]
    """

    post: str | None = None
    scale: float = 1.0

    def module(self, layer: nn.Module) -> nn.Module | None:
        """``layer``'s post module (None without one)."""
        return layer.get_submodule(self.post) if self.post is not None else None

    def apply(self, post: nn.Module | None, y: torch.Tensor) -> torch.Tensor:
        """``scale * post(y)`` (``post``: this layer's module, or an fp32 copy of it)."""
        y = post(y) if post is not None else y
        return y * self.scale if self.scale != 1.0 else y


@torch.no_grad()
def mlp_branch(model: nn.Module, structure: ModelStructure, layer_index: int, batch: dict) -> MlpBranch:
    """How a decoder layer's output depends on its MLP's output (:class:`MlpBranch`), read from one
    short forward pass up to the layer and two runs of it, the second with the MLP's output moved
    by noise; nothing changes. The MLP's output may go through one module (a norm) and a constant
    factor before it joins the residual stream; a layer whose output depends on it otherwise (a
    norm after the residual sum) is refused: the fit's targets assume ``output = stream + branch``.

    Example:
        >>> from pruner.structure import discover
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("gemma2")
        >>> mlp_branch(model, discover(model), 1, {"input_ids": torch.randint(3, 120, (1, 8))})
        MlpBranch(post='post_feedforward_layernorm', scale=1.0)
    """
    info = structure.layers[layer_index]
    layer, mlp = model.get_submodule(info.path), model.get_submodule(info.mlp.module)
    short = {k: v[:1, :16] for k, v in batch.items() if torch.is_tensor(v)}
    ((hidden, kwargs),) = capture_layer_inputs(model, layer, [short])
    if hidden.dtype != torch.float32 and info.mlp.module.startswith(info.path + "."):
        # in fp32 on a copy of the layer: bf16's rounding of the stream would swamp the MLP's share
        layer = copy.deepcopy(layer).float()
        mlp = layer.get_submodule(info.mlp.module[len(info.path) + 1:])
        hidden, kwargs = hidden.float(), _as_float(kwargs)
    inside_mlp = {id(m) for m in mlp.modules()}
    watch = {n: m for n, m in layer.named_modules() if n and id(m) not in inside_mlp
             and not isinstance(m, nn.Dropout)}  # a dropout is the identity here
    was_training = model.training
    model.eval()  # no dropout between the two runs
    layer.eval()
    try:
        called: list[str] = []
        once, _, y = run_layer(layer, mlp, hidden, kwargs, watch=watch, called=called)
        branch = MlpBranch(post=called[0] if called else None)
        post = branch.module(layer)
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
        moved = y + noise * y.float().std().clamp_min(1e-6).to(y.dtype)
        twice, _, _ = run_layer(layer, mlp, hidden, kwargs, replace=lambda out: moved.clone())
        change = (twice - once).double()  # what the layer's output moved by
        expected = (branch.apply(post, moved) - branch.apply(post, y)).double()  # what the branch moved by
    finally:
        model.train(was_training)
    scale = float((change * expected).sum() / expected.square().sum().clamp_min(1e-30))  # least squares
    scale = float(f"{scale:.6g}")  # a config's multiplier (0.22), not its fp32 rounding (0.22000001)
    error = float((change - scale * expected).norm() / change.norm().clamp_min(1e-30))
    if not (error < 1e-2 and math.isfinite(scale) and scale != 0.0):
        after = f" then {branch.post}" if branch.post else ""
        raise PrunerError(f"regional_epochs needs decoder layers whose output is the residual stream plus a "
                          f"multiple of their MLP's output (or of a norm of it); {info.path} is not (moving its "
                          f"MLP{after}'s output moves the layer's output otherwise, relative error {error:.2g}: a "
                          "norm after the residual sum?): set regional_epochs=0")
    return MlpBranch(post=branch.post, scale=1.0 if abs(scale - 1.0) < 1e-4 else scale)


def _as_float(value):
    """``value`` with every floating tensor in it (dicts, tuples, lists) cast to fp32."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _as_float(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float(v) for v in value)
    return value


def _global_sum(value: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    return all_reduce(value) if all_reduce is not None else value


def _sum_of_squares(rows: torch.Tensor, keep: torch.Tensor | None) -> float:
    """``Σ ||row||²`` over the kept rows (tokens) of ``rows`` (N, d), in fp64."""
    per_row = rows.double().square().sum(1)  # (N,)
    return float(per_row[keep].sum() if keep is not None else per_row.sum())


def fit_mlp(mlp: nn.Module, x: torch.Tensor, target: torch.Tensor, epochs: int, lr: float, seed: int,
            all_reduce: AllReduce | None = None,
            branch: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """An fp32 copy of ``mlp`` trained so that ``copy(x) ≈ target`` (``x``: (N, d_in), ``target``:
    (N, d_out), this rank's tokens), or ``branch(copy(x)) ≈ target`` with ``branch`` (fixed, fp32:
    what the layer does to its MLP's output, :class:`MlpBranch`): AdamW on the error relative to
    the target's mean energy, ``epochs`` passes in shuffled batches of :data:`BATCH_TOKENS` tokens. With ``all_reduce``
    every step's gradients are averaged over ranks (each rank steps through its own tokens; the
    step count, from all ranks' tokens, is the same on every rank), so every rank ends with the
    same weights.

    Example:
        >>> mlp = torch.nn.Linear(4, 4)
        >>> x = torch.randn(1024, 4)
        >>> fitted = fit_mlp(mlp, x, 2 * x, epochs=20, lr=1e-2, seed=0)
        >>> bool((fitted(x) - 2 * x).square().mean() < (mlp(x) - 2 * x).square().mean())
        True
    """
    x, target = x.float(), target.float()
    sums = torch.tensor([float(len(x)), float(target.double().square().sum()), 1.0], dtype=torch.float64)
    tokens, energy, world = (float(v) for v in _global_sum(sums, all_reduce))  # over every rank
    mean_energy = max(energy / max(tokens, 1.0), 1e-30)
    fitted = copy.deepcopy(mlp).float().eval().requires_grad_(True)
    params = list(fitted.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * max(1, -(-int(tokens) // (int(world) * BATCH_TOKENS)))
    order = torch.empty(0, dtype=torch.long)
    with torch.enable_grad():
        for _ in range(steps):
            if len(order) < BATCH_TOKENS:  # a fresh pass over this rank's tokens
                order = torch.cat([order, torch.randperm(len(x), generator=g)])
            idx, order = order[:BATCH_TOKENS].to(x.device), order[BATCH_TOKENS:]
            out = fitted(x[idx])
            out = branch(out) if branch is not None else out
            loss = (out - target[idx]).square().sum(1).mean() / mean_energy
            loss.backward()
            if all_reduce is not None:  # the mean of the ranks' gradients
                flat = all_reduce(torch.cat([p.grad.reshape(-1) for p in params])) / world
                for p, part in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(part.view_as(p))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return fitted.requires_grad_(False)


def _install(mlp: nn.Module, fitted: nn.Module, transaction: Transaction) -> None:
    """``fitted``'s weights in place of ``mlp``'s (new parameters, recorded: a rollback undoes it)."""
    new = dict(fitted.named_parameters())
    for name, old in list(mlp.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = mlp.get_submodule(owner_name) if owner_name else mlp
        value = nn.Parameter(new[name].detach().to(dtype=old.dtype, device=old.device),
                             requires_grad=old.requires_grad)
        transaction.set_parameter(owner, attr, value)


def regional_fit(model: nn.Module, structure: ModelStructure, cfg: PruneConfig, batches: list[dict],
                 dense_outputs: dict[str, list[torch.Tensor]], transaction: Transaction,
                 all_reduce: AllReduce | None = None, branch: MlpBranch | None = None) -> dict:
    """Fits the MLP of every layer of :func:`fitted_layers` of the pruned ``model``, in layer
    order, to the targets of the module docstring; ``dense_outputs``: per decoder layer path,
    the dense layer's outputs on ``batches`` in order (any split into micro-batches of whole
    samples); ``branch``: what the layers do to their MLP's output (:func:`mlp_branch`; None: add
    it to the stream). Every weight changed is recorded in ``transaction``. Returns the report
    ``{"layers", "error_before", "error_after", "seconds"}`` (relative errors per layer)."""
    start = time.time()
    layers = fitted_layers(structure, cfg)
    report = {"layers": [], "error_before": [], "error_after": [], "epochs": cfg.regional_epochs,
              "lr": cfg.regional_lr, "seconds": 0.0}
    if not layers:
        return report
    missing = [structure.layers[i].path for i in layers if not dense_outputs.get(structure.layers[i].path)]
    if missing:
        raise PrunerError(f"regional reconstruction: no dense outputs were recorded for {missing[:3]}")
    was_training = model.training
    model.eval()  # no dropout in the layers' outputs (a Lightning fit may have left train mode on)
    try:
        _walk(model, structure, cfg, layers, batches, dense_outputs, transaction, all_reduce, report,
              branch or MlpBranch())
    finally:
        model.train(was_training)
    seconds = _global_sum(torch.tensor([time.time() - start, 1.0], dtype=torch.float64), all_reduce)
    report["seconds"] = round(float(seconds[0] / seconds[1]), 1)  # the mean over ranks: one report on every rank
    return report


def token_mask(batches: list[dict], device) -> torch.Tensor | None:
    """(N,) the tokens of ``batches``, in order, that are not padding; None where no batch has a mask."""
    masks = [b.get("attention_mask") for b in batches]
    if not any(m is not None for m in masks):
        return None
    return torch.cat([(m != 0).reshape(-1) if m is not None else torch.ones(b["input_ids"].numel(), dtype=torch.bool)
                      for m, b in zip(masks, batches)]).to(device)


def _walk(model: nn.Module, structure: ModelStructure, cfg: PruneConfig, layers: list[int], batches: list[dict],
          dense_outputs: dict[str, list[torch.Tensor]], transaction: Transaction, all_reduce: AllReduce | None,
          report: dict, branch: MlpBranch) -> None:
    """The layers from the first fitted one to the last, in order: fit each MLP, carry the stream on."""
    first = model.get_submodule(structure.layers[layers[0]].path)
    states = capture_layer_inputs(model, first, batches)  # [(hidden (B, T, d), kwargs)] per batch
    keep = token_mask(batches, states[0][0].device)
    for index in range(layers[0], layers[-1] + 1):
        info = structure.layers[index]
        layer = model.get_submodule(info.path)
        if index not in layers:  # a layer between fitted ones: its output carries the stream on
            with torch.no_grad():
                states = [(_first(layer(h, **kw)), kw) for h, kw in states]
            continue
        states = fit_layer(model, structure, cfg, index, states, dense_outputs[info.path], keep, transaction,
                           all_reduce, report, branch)


def fit_layer(model: nn.Module, structure: ModelStructure, cfg: PruneConfig, index: int,
              states: list[tuple[torch.Tensor, dict]], dense_outputs: list[torch.Tensor], keep: torch.Tensor | None,
              transaction: Transaction, all_reduce: AllReduce | None, report: dict,
              branch: MlpBranch | None = None) -> list[tuple[torch.Tensor, dict]]:
    """Layer ``index``'s MLP fit on the pruned stream ``states`` (its inputs, per batch) towards the
    dense layer's ``dense_outputs`` (per batch, any split into whole samples), kept where it lowers
    the error; returns the stream after the layer. Appends the layer's errors to ``report``.
    ``branch``: what the layer adds to the stream from its MLP's output (None: that output)."""
    info = structure.layers[index]
    layer = model.get_submodule(info.path)
    mlp = model.get_submodule(info.mlp.module)
    branch = branch or MlpBranch()
    post = branch.module(layer)
    runs = [run_layer(layer, mlp, h, kw) for h, kw in states]  # [(out, x, y)], each (B, T, ·)
    sizes = [out.shape[:-1] for out, _, _ in runs]
    x = torch.cat([x.reshape(-1, x.shape[-1]) for _, x, _ in runs])  # (N, d) the MLP's inputs
    with torch.no_grad():  # (N, d) what the layer adds from its MLP's outputs (pruned): scale * post(y)
        y = branch.apply(post, torch.cat([y.reshape(-1, y.shape[-1]) for _, _, y in runs]))
    stream = torch.cat([out.reshape(-1, out.shape[-1]) for out, _, _ in runs]) - y  # (N, d) entering the MLP
    del runs
    dense = torch.cat([o.reshape(-1, o.shape[-1]) for o in dense_outputs])  # (N, d)
    if dense.shape != stream.shape:
        raise PrunerError(f"regional reconstruction: {tuple(dense.shape)} dense outputs recorded for {info.path} "
                          f"but {tuple(stream.shape)} tokens in its batches: pass the batches the statistics "
                          "pass ran")
    target = dense.to(stream.device, stream.dtype) - stream  # (N, d): y* = h_dense[l+1] - r[l]
    del dense
    fit_x, fit_target = (x, target) if keep is None else (x[keep], target[keep])  # padding has no target
    fixed = copy.deepcopy(post).float().eval().requires_grad_(False) if post is not None else None

    def through(out: torch.Tensor) -> torch.Tensor:  # the fp32 MLP's output as the layer adds it
        return branch.apply(fixed, out)

    fitted = fit_mlp(mlp, fit_x, fit_target, cfg.regional_epochs, cfg.regional_lr, cfg.seed + index, all_reduce,
                     branch=through)
    del fit_x, fit_target
    with torch.no_grad():
        new = torch.cat([through(fitted(part.float())) for part in x.split(4096)]).to(y.dtype)  # (N, d)
    sums = torch.tensor([_sum_of_squares(y - target, keep), _sum_of_squares(new - target, keep),
                         _sum_of_squares(target, keep)], dtype=torch.float64)
    before, after, energy = (float(v) for v in _global_sum(sums, all_reduce))  # over every rank
    before, after = before / max(energy, 1e-30), after / max(energy, 1e-30)
    if after < before:  # kept only where it helps (the same decision on every rank: global sums)
        _install(mlp, fitted, transaction)
        if new.dtype != torch.float32:  # the stream the installed (e.g. bf16) weights really give
            with torch.no_grad():
                new = torch.cat([branch.apply(post, mlp(part)) for part in x.split(4096)])
        y = new
    report["layers"].append(index)
    report["error_before"].append(before)
    report["error_after"].append(min(after, before))
    # the stream after the layer: the residual plus what the (new) MLP adds, per batch again
    out = (stream + y).split([math.prod(size) for size in sizes])
    return [(o.view(*size, -1), kw) for o, size, (_, kw) in zip(out, sizes, states)]
