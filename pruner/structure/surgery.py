"""Exact structural removal: slice weights, update module attributes and the config.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from pruner.structure import LayerPlan, Plan
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> plan = Plan([LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1], mlp_channels_kept=list(range(48))),
    ...              LayerPlan(1)])
    >>> _ = apply_plan(plan, model)  # returns the dense structure it checked the plan against
    >>> model.model.layers[0].self_attn.q_proj.weight.shape, model.model.layers[0].mlp.up_proj.weight.shape
    (torch.Size([32, 64]), torch.Size([48, 64]))
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_model
from ..errors import PlanMismatchError
from .discovery import HEAD_ATTRS, discover
from .groups import Family, ModelStructure
from .params import model_fingerprint
from .plan import LayerPlan, Plan
from .spec import settable
from .spill import SpillFolder, SpilledTensor

KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
GROUP_ATTRS = ("num_key_value_groups", "n_rep")
_MISSING = object()
_REBUILD = object()  # a log entry that rebuilds a sliced Parameter's storage


class Transaction:
    """Every change surgery makes to a model, recorded so that it can be undone exactly.

    Surgery never edits a tensor in place: it puts new parameters, attributes and configs in
    the place of the old ones, and this log keeps the old objects until :meth:`commit`. On
    any error :meth:`rollback` puts them back, so a failed ``apply_plan`` (or a failed step of
    ``pruner.prune``) leaves the model exactly as it was. A sliced weight keeps only what the
    slice removed (:meth:`shrink_parameter`): the old Parameter object stays in the log with its
    storage released, and a rollback rebuilds it from the new weight and the removed slabs, so
    the cost of undo is the removed part of each sliced weight, not a second copy of its kept
    part (a refit weight keeps its old kept block as well: the refit replaced it).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> tx = Transaction()
        >>> tx.set(lin, "out_features", 1)
        >>> tx.rollback(); lin.out_features
        2
    """

    def __init__(self) -> None:
        self._log: list[tuple[object, str, object]] = []
        self._files: SpillFolder | None = None
        self._spilled: list[tuple[nn.Parameter, SpilledTensor]] = []  # replaced parameters' storage on disk

    def set(self, obj, attr: str, value) -> None:
        """``setattr(obj, attr, value)``, recorded."""
        self._log.append((obj, attr, getattr(obj, attr, _MISSING)))
        setattr(obj, attr, value)

    def set_parameter(self, module: nn.Module, attr: str, value: nn.Parameter) -> None:
        """``module._parameters[attr] = value``, recorded (tied weights: call once per owner)."""
        self._log.append((module._parameters, attr, module._parameters[attr]))
        module._parameters[attr] = value

    def shrink_parameter(self, old: nn.Parameter, new: nn.Parameter, owners: list[tuple[nn.Module, str]],
                         slabs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                         kept_old: torch.Tensor | None = None) -> None:
        """Puts ``new`` (``old`` sliced) in ``old``'s place in every owner and releases ``old``'s
        storage. ``slabs``: the slicing steps in order, each ``(dim, kept indices, removed
        indices, removed values)``; ``kept_old``: the old kept block where ``new`` does not hold
        it (a refit). The undo rebuilds ``old.data`` from them (see :meth:`rollback`)."""
        for module, attr in owners:
            self.set_parameter(module, attr, new)
        kept = new if kept_old is None else kept_old
        self._log.append((_REBUILD, old, (kept, slabs, old.data.shape)))
        old.data = torch.empty(0, dtype=old.dtype, device=old.device)

    def spill(self) -> int:
        """Moves what only this log holds into files (:class:`~pruner.structure.spill.SpillFolder`):
        the removed slabs, the kept blocks a refit replaced, the storage of parameters replaced
        whole. The model's own tensors stay. A rollback reads the files back; returns the bytes
        moved by this call."""
        if self._files is None:
            self._files = SpillFolder()
        before = self._files.bytes
        on_disk = {id(p) for p, _ in self._spilled}
        for i, (obj, attr, old) in enumerate(self._log):
            if obj is _REBUILD:
                kept, slabs, shape = old
                if not isinstance(kept, (nn.Parameter, SpilledTensor)):  # a refit's old kept block
                    kept = self._files.put(kept)
                slabs = [(dim, keep, removed, values if isinstance(values, SpilledTensor) else self._files.put(values))
                         for dim, keep, removed, values in slabs]
                self._log[i] = (obj, attr, (kept, slabs, shape))
            elif isinstance(obj, dict) and isinstance(old, nn.Parameter) and id(old) not in on_disk and old.numel():
                # replaced in its module: no longer the model's (tied owners are all replaced by now)
                self._spilled.append((old, self._files.put(old.data)))
                on_disk.add(id(old))
                old.data = torch.empty(0, dtype=old.dtype, device=old.device)
        return self._files.bytes - before

    def rollback(self) -> None:
        for param, stored in self._spilled:  # first: rebuilds may start from these
            param.data = stored.load()
        self._spilled.clear()
        for obj, attr, old in reversed(self._log):
            if obj is _REBUILD:
                attr.data = _rebuilt(*old)
                continue
            if isinstance(obj, dict):
                obj[attr] = old
            elif old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        self._log.clear()
        self._close()

    def commit(self) -> None:
        self._log.clear()  # the replaced objects may now be freed
        self._spilled.clear()
        self._close()

    def _close(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None


def _rebuilt(kept: torch.Tensor, slabs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
             shape: torch.Size) -> torch.Tensor:
    """The tensor that slicing by ``slabs`` (in order) turned into ``kept``."""
    data = (kept.load() if isinstance(kept, SpilledTensor) else kept).detach()
    for dim, keep, removed, values in reversed(slabs):
        values = values.load() if isinstance(values, SpilledTensor) else values
        full = list(data.shape)
        full[dim] = len(keep) + len(removed)
        out = data.new_empty(full)
        out.index_copy_(dim, keep.to(data.device), data)
        out.index_copy_(dim, removed.to(data.device), values)
        data = out
    assert tuple(data.shape) == tuple(shape)
    return data


def _removed_indices(family: Family, groups: list[int], out: dict[tuple[str, int], set[int]]) -> None:
    chosen = torch.tensor(groups, dtype=torch.long)
    for m in family.members:
        out.setdefault((m.param, m.dim), set()).update(m.indices[chosen].reshape(-1).tolist())


def _complement(kept: list[int] | None, n: int, what: str) -> list[int]:
    if kept is None:
        return []
    bad = [k for k in kept if not 0 <= k < n]
    if bad or len(set(kept)) != len(kept):
        raise PlanMismatchError(f"{what}: kept indices {kept[:8]} are out of range 0..{n - 1} or repeated")
    if not kept:
        raise PlanMismatchError(f"{what}: keeps nothing; remove the whole layer instead (mode='layer')")
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def check_plan(plan: Plan, structure: ModelStructure) -> None:
    """Raises :class:`PlanMismatchError` when ``plan`` does not fit the discovered structure."""
    if len(plan.layers) != len(structure.layers):
        raise PlanMismatchError(
            f"the plan has {len(plan.layers)} layers but the model has {len(structure.layers)}: "
            "apply a plan to the dense model it was made for"
        )
    for lp, info in zip(plan.layers, structure.layers):
        a, m = info.attention, info.mlp
        if a is not None and (lp.heads_kept is not None or lp.kv_heads_kept is not None):
            kv = lp.kv_heads_kept if lp.kv_heads_kept is not None else list(range(a.num_kv_heads))
            _complement(kv, a.num_kv_heads, f"layer {lp.index} key/value heads")
            heads = lp.heads_kept if lp.heads_kept is not None else [
                h for h in range(a.num_heads) if h // (a.num_heads // a.num_kv_heads) in kv]
            _complement(heads, a.num_heads, f"layer {lp.index} attention heads")
            n_rep = a.num_heads // a.num_kv_heads
            per_group = {g: sum(1 for h in heads if h // n_rep == g) for g in kv}
            if any(h // n_rep not in kv for h in heads) or len(set(per_group.values())) != 1:
                raise PlanMismatchError(
                    f"layer {lp.index}: kept query heads {heads} must belong to kept key/value heads {kv} "
                    "and be equally many in each (GQA needs the same number of query heads per group)"
                )
        if m is not None:
            _complement(lp.mlp_channels_kept, m.num_channels, f"layer {lp.index} MLP channels")
    _complement(plan.hidden_kept, structure.hidden_size, "hidden channels")
    if all(lp.removed for lp in plan.layers):
        raise PlanMismatchError("the plan removes every layer; keep at least one")


def removed_slices(plan: Plan, structure: ModelStructure) -> dict[tuple[str, int], set[int]]:
    """``{(parameter, dim): indices}`` that ``plan`` removes (layers removed whole are not listed)."""
    removed: dict[tuple[str, int], set[int]] = {}
    for lp, info in zip(plan.layers, structure.layers):
        if lp.removed:
            continue
        a = info.attention
        if a is not None:
            kv = lp.kv_heads_kept if lp.kv_heads_kept is not None else list(range(a.num_kv_heads))
            n_rep = a.num_heads // a.num_kv_heads
            heads = lp.heads_kept if lp.heads_kept is not None else [h for h in range(a.num_heads) if h // n_rep in kv]
            dropped_groups = [g for g in range(a.num_kv_heads) if g not in kv]
            dropped_heads = [h for h in range(a.num_heads) if h not in heads and h // n_rep in kv]
            _removed_indices(a.kv_groups, dropped_groups, removed)
            _removed_indices(a.heads, dropped_heads, removed)
        if info.mlp is not None and lp.mlp_channels_kept is not None:
            _removed_indices(info.mlp.channels, _complement(lp.mlp_channels_kept, info.mlp.num_channels, ""), removed)
    if plan.hidden_kept is not None:
        _removed_indices(structure.hidden_family(), _complement(plan.hidden_kept, structure.hidden_size, ""), removed)

    return removed


def kept_and_removed(size: int, removed: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices ``0..size-1`` that stay and those in ``removed``, each ascending (long)."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[torch.tensor(sorted(removed), dtype=torch.long)] = False
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


@dataclass(frozen=True)
class Source:
    """Where one tensor of the pruned model comes from: the dense tensor ``name``, with only the
    ``keep`` indices of each listed dim (in order), times ``scale`` (the RMSNorm weights of a
    hidden-channel plan). :meth:`take` computes exactly what :func:`apply_plan` leaves there."""

    name: str
    keep: tuple[tuple[int, torch.Tensor], ...] = ()
    scale: float | None = None

    def take(self, dense: torch.Tensor) -> torch.Tensor:
        """The pruned tensor from the dense one (e.g. a gathered FSDP2 parameter)."""
        for dim, idx in self.keep:
            dense = dense.index_select(dim, idx.to(dense.device))
        return dense * self.scale if self.scale is not None else dense


def kept_layer_name(name: str, plan: Plan, structure: ModelStructure) -> str | None:
    """The name a dense model's tensor ``name`` has after :func:`apply_plan` (its decoder layer
    renumbered when earlier layers are removed); None when the plan removes its layer."""
    prefix = structure.layers_path + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    kept = [lp.index for lp in plan.layers if not lp.removed]
    if int(index) not in kept:
        return None
    return f"{prefix}{kept.index(int(index))}.{rest}"


def pruned_sources(plan: Plan, structure: ModelStructure) -> dict[str, Source]:
    """``{pruned parameter name: Source}`` for every parameter (tied names each) of the model
    :func:`apply_plan` makes of the dense model ``structure`` describes: what a sharded model's
    surgery reads, one tensor at a time, instead of slicing a whole model. No refit.

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> structure = discover(model)
        >>> plan = Plan([LayerPlan(0, mlp_channels_kept=[0, 5])] + [LayerPlan(i) for i in range(1, 3)])
        >>> source = pruned_sources(plan, structure)["model.layers.0.mlp.down_proj.weight"]
        >>> source.name, [(dim, idx.tolist()) for dim, idx in source.keep]
        ('model.layers.0.mlp.down_proj.weight', [(1, [0, 5])])
    """
    check_plan(plan, structure)
    removed: dict[str, dict[int, set[int]]] = {}
    for (name, dim), idx in removed_slices(plan, structure).items():
        if idx:
            removed.setdefault(name, {}).setdefault(dim, set()).update(idx)
    scaled: set[str] = set()
    scale = None
    if plan.hidden_kept is not None:  # the RMSNorm rescaling of _shrink_hidden
        scaled = {f"{n}.weight" for info in structure.layers for n in info.norms}
        scaled |= {f"{n}.weight" for n in structure.final_norms}
        scale = math.sqrt(structure.hidden_size / len(plan.hidden_kept))
    out: dict[str, Source] = {}
    for name, shape in structure.shapes.items():
        new_name = kept_layer_name(name, plan, structure)
        if new_name is None:
            continue
        keep = tuple((dim, kept_and_removed(shape[dim], idx)[0]) for dim, idx in removed.get(name, {}).items())
        out[new_name] = Source(name, keep, scale if name in scaled else None)
    return out


@torch.no_grad()
def apply_plan(plan: Plan, model: nn.Module, structure: ModelStructure | None = None,
               refit: dict[str, torch.Tensor] | None = None, transaction: Transaction | None = None,
               check_fingerprint: bool = True) -> ModelStructure:
    """Removes what ``plan`` says from ``model`` in place (indices refer to the dense model).

    Validates the whole plan before touching any weight; a failure later on undoes every
    change (see :class:`Transaction`), so the model is pruned completely or not at all.
    ``refit``: ``{parameter name: tensor}`` to use as the pruned parameter instead of the
    sliced one (the least-squares refit of :func:`pruner.refit.least_squares.compensate`); each must
    have the pruned shape. ``transaction``: record into the caller's (``pruner.prune`` undoes
    all of its steps together); None = a transaction of this call alone. A plan that records
    the fingerprint of its dense model (every finished plan does) is refused for a model with
    another one, unless ``check_fingerprint=False`` (e.g. weights trained since, then replaced
    by a checkpoint's). Returns the structure of the dense model the plan was checked against."""
    if not isinstance(plan, Plan):
        raise PlanMismatchError(f"plan must be a pruner.Plan, got {type(plan).__name__}: read plan.json with "
                                "pruner.Plan.load(path), or build one with pruner.Plan.from_dict(d)")
    check_model(model)
    structure = structure or discover(model)
    check_plan(plan, structure)
    expected = (plan.model or {}).get("fingerprint")
    if check_fingerprint and expected:
        actual = model_fingerprint(model)
        if actual != expected:
            raise PlanMismatchError(
                f"the plan was made for a model with fingerprint {expected}, this {type(model).__name__} has "
                f"{actual} (other weights or another model): apply a plan to the dense model it was made for, or "
                "pass check_fingerprint=False if the weights only differ by training")
    removed = removed_slices(plan, structure)
    own = transaction is None
    tx = Transaction() if own else transaction
    try:
        _slice_parameters(model, removed, refit or {}, tx)
        _sync_module_sizes(model, tx)
        record_sizes(plan, model, structure, tx)
        if plan.hidden_kept is not None:
            _shrink_hidden(model, structure, len(plan.hidden_kept), tx)
        if any(lp.removed for lp in plan.layers):
            _remove_layers(model, structure, [lp.index for lp in plan.layers if lp.removed], tx)
    except BaseException:
        if own:
            tx.rollback()
        raise
    if own:
        tx.commit()
    return structure


@torch.no_grad()
def apply_layer(plan: Plan, model: nn.Module, structure: ModelStructure, index: int,
                refit: dict[str, torch.Tensor] | None, transaction: Transaction) -> None:
    """Removes what ``plan`` says from decoder layer ``index`` alone (heads and MLP channels; the
    layer-sequential refit prunes one layer at a time), recorded in ``transaction``; the caller
    checked the plan. :func:`record_sizes` afterwards gives every layer its sizes, as
    :func:`apply_plan` does."""
    lp, info = plan.layers[index], structure.layers[index]
    if lp.removed or plan.hidden_kept is not None:
        raise PlanMismatchError("apply_layer removes heads and MLP channels of one layer, not layers or hidden channels")
    alone = Plan([lp if i == index else LayerPlan(i) for i in range(len(plan.layers))])
    _slice_parameters(model, removed_slices(alone, structure), refit or {}, transaction)
    _sync_module_sizes(model, transaction)
    _record_layer_sizes(lp, info, dict(model.named_modules()), transaction)


def record_sizes(plan: Plan, model: nn.Module, structure: ModelStructure, tx: Transaction) -> None:
    """Every kept layer's attention and MLP modules (and their private configs) say the widths
    their weights now have."""
    modules = dict(model.named_modules())
    for lp, info in zip(plan.layers, structure.layers):
        if not lp.removed:
            _record_layer_sizes(lp, info, modules, tx)


def _record_layer_sizes(lp: LayerPlan, info, modules: dict[str, nn.Module], tx: Transaction) -> None:
    if info.attention is not None:
        a = info.attention
        n_heads = modules[a.consumer].in_features // a.head_dim
        n_kv = len(lp.kv_heads_kept) if lp.kv_heads_kept is not None else a.num_kv_heads
        _set_attention_sizes(modules[a.module], n_heads, n_kv, a, tx)
    if info.mlp is not None:
        _set_config_value(modules[info.mlp.module], "intermediate_size", modules[info.mlp.consumer].in_features, tx)


@torch.no_grad()
def mask_plan(plan: Plan, model: nn.Module, structure: ModelStructure | None = None) -> None:
    """Zeroes what ``plan`` removes instead of removing it (a removed layer: all its parameters,
    which makes it the identity). The masked model computes what the pruned one computes."""
    if not isinstance(plan, Plan):
        raise PlanMismatchError(f"plan must be a pruner.Plan, got {type(plan).__name__}: pruner.Plan.load(path)")
    check_model(model)
    structure = structure or discover(model)
    check_plan(plan, structure)
    params = dict(model.named_parameters(remove_duplicate=False))
    for (name, dim), idx in removed_slices(plan, structure).items():
        if idx:
            params[name].data.index_fill_(dim, torch.tensor(sorted(idx), device=params[name].device), 0.0)
    for lp in plan.layers:
        if lp.removed:
            for p in model.get_submodule(f"{structure.layers_path}.{lp.index}").parameters():
                p.data.zero_()


def _slice_parameters(model: nn.Module, removed: dict[tuple[str, int], set[int]],
                      refit: dict[str, torch.Tensor], tx: Transaction) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(refit) - set(params))
    if unknown:
        raise PlanMismatchError(f"refit weights for {unknown[:3]}, which the model does not have")
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, attr))
    per_tensor: dict[int, dict[int, set[int]]] = {}
    for (name, dim), idx in removed.items():
        if idx:
            per_tensor.setdefault(id(params[name]), {}).setdefault(dim, set()).update(idx)
    refit_of = {id(params[name]): t for name, t in refit.items()}
    by_id = {id(p): p for p in params.values()}
    for tensor_id, dims in per_tensor.items():
        p = by_id[tensor_id]
        data = p.data
        slabs = []  # what each slicing step removed, for the undo
        for dim, idx in dims.items():
            keep, drop = kept_and_removed(data.shape[dim], idx)
            slabs.append((dim, keep, drop, data.index_select(dim, drop.to(data.device))))
            data = data.index_select(dim, keep.to(data.device))
        kept_old = None
        if tensor_id in refit_of:
            given = refit_of[tensor_id]
            if tuple(given.shape) != tuple(data.shape):
                raise PlanMismatchError(f"refit weight of shape {tuple(given.shape)} for a parameter pruned to "
                                        f"{tuple(data.shape)}")
            kept_old, data = data, given.to(dtype=data.dtype, device=data.device)
        new = nn.Parameter(data.contiguous(), requires_grad=p.requires_grad)
        tx.shrink_parameter(p, new, owners[tensor_id], slabs, kept_old)  # tied weights stay tied
    if set(refit_of) - set(per_tensor):
        raise PlanMismatchError("refit weights were given for parameters the plan does not prune")


def _sync_module_sizes(model: nn.Module, tx: Transaction) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            if (mod.out_features, mod.in_features) != (out_f, in_f):
                tx.set(mod, "out_features", out_f)
                tx.set(mod, "in_features", in_f)
        elif isinstance(mod, nn.Embedding) and mod.embedding_dim != mod.weight.shape[1]:
            tx.set(mod, "embedding_dim", mod.weight.shape[1])
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None \
                and tuple(mod.normalized_shape) != (mod.weight.shape[0],):
            tx.set(mod, "normalized_shape", (mod.weight.shape[0],))


def _own_config(module: nn.Module, tx: Transaction):
    """Gives ``module`` a private copy of its config so per-layer sizes can differ."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    if not getattr(cfg, "_pruner_private", False):
        cfg = copy.copy(cfg)
        cfg._pruner_private = True
        cfg._pruner_keys = set()  # which sizes this module overrides (see io._uniform_config)
        tx.set(module, "config", cfg)
    else:  # already private (an earlier step): edit a copy, so that a rollback restores this one
        cfg = copy.copy(cfg)
        cfg._pruner_keys = set(cfg._pruner_keys)
        tx.set(module, "config", cfg)
    return cfg


def _set_config_value(module: nn.Module, key: str, value: int, tx: Transaction) -> None:
    if hasattr(module, key) and isinstance(getattr(module, key), int):
        tx.set(module, key, value)
    cfg = _own_config(module, tx)
    if cfg is not None and hasattr(cfg, key):
        setattr(cfg, key, value)  # cfg is this transaction's own copy
        cfg._pruner_keys.add(key)


def _set_attention_sizes(module: nn.Module, n_heads: int, n_kv: int, info, tx: Transaction) -> None:
    for attrs, value in ((HEAD_ATTRS, n_heads), (KV_ATTRS, n_kv), (GROUP_ATTRS, n_heads // n_kv)):
        for attr in attrs:
            if isinstance(getattr(module, attr, None), int):
                tx.set(module, attr, value)
    cfg = _own_config(module, tx)
    if cfg is not None:
        cfg.num_attention_heads, cfg.num_key_value_heads = n_heads, n_kv
        cfg._pruner_keys.update({"num_attention_heads", "num_key_value_heads"})
        if settable(cfg, "head_dim"):  # keep it explicit: hidden_size // heads no longer holds
            cfg.head_dim = info.head_dim


def _shrink_hidden(model: nn.Module, structure: ModelStructure, new_hidden: int, tx: Transaction) -> None:
    old = structure.hidden_size
    # RMSNorm over fewer channels: mean(x^2) grows by old/new; rescaling the weight by sqrt(old/new)
    # and eps by old/new makes the pruned norm equal the masked dense one exactly.
    ratio = old / new_hidden
    modules = dict(model.named_modules())
    norms = [n for info in structure.layers for n in info.norms] + structure.final_norms
    for name in norms:
        norm = modules[name]
        tx.set_parameter(norm, "weight", nn.Parameter(norm.weight.data * math.sqrt(ratio),
                                                      requires_grad=norm.weight.requires_grad))
        for attr in ("variance_epsilon", "eps", "epsilon"):
            if isinstance(getattr(norm, attr, None), float):
                tx.set(norm, attr, getattr(norm, attr) * ratio)
    cfg = model.config
    for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        if isinstance(getattr(cfg, key, None), float):
            tx.set(cfg, key, getattr(cfg, key) * ratio)
    if getattr(cfg, "head_dim", None) is None and settable(cfg, "head_dim"):  # hidden // heads no longer holds
        attention = next((info.attention for info in structure.layers if info.attention is not None), None)
        heads = getattr(cfg, "num_attention_heads", None)
        tx.set(cfg, "head_dim", attention.head_dim if attention is not None
               else old // heads if isinstance(heads, int) and heads else None)
    tx.set(cfg, "hidden_size", new_hidden)
    for mod in model.modules():
        if getattr(mod, "hidden_size", None) == old:
            tx.set(mod, "hidden_size", new_hidden)
        sub_cfg = getattr(mod, "config", None)
        if sub_cfg is not None and sub_cfg is not cfg and getattr(sub_cfg, "hidden_size", None) == old:
            tx.set(sub_cfg, "hidden_size", new_hidden)
            if settable(sub_cfg, "head_dim"):
                tx.set(sub_cfg, "head_dim", cfg.head_dim)


def _remove_layers(model: nn.Module, structure: ModelStructure, indices: list[int], tx: Transaction) -> None:
    stack = model.get_submodule(structure.layers_path)
    kept = [i for i in range(len(stack)) if i not in set(indices)]
    new_stack = nn.ModuleList([stack[i] for i in kept])
    parent_name, _, attr = structure.layers_path.rpartition(".")
    tx.set(model.get_submodule(parent_name) if parent_name else model, attr, new_stack)
    for new_idx, layer in enumerate(new_stack):  # the KV cache is indexed by layer_idx
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and mod.layer_idx != new_idx:
                tx.set(mod, "layer_idx", new_idx)
    cfg = model.config
    tx.set(cfg, "num_hidden_layers", len(kept))
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(stack):
        tx.set(cfg, "layer_types", [layer_types[i] for i in kept])
