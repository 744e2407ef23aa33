"""The one pruning loop: select -> refine -> (OBS -> refit -> remove -> regional fit, layer by
layer) or remove, in ``iterative_steps``.

``pruner.prune`` and ``StructuralPruneCallback`` both run :func:`prune_steps`; they differ only
in what :class:`StepHooks` supplies: where the importance of a step comes from (calibration
batches run here, or gradients accumulated during a Lightning fit and summed over ranks), how
a tensor is summed over ranks, and what must be checked before weights change (ranks agree,
LoRA targets survive). Every step's surgery joins one :class:`~pruner.structure.Transaction`,
so an error in any step leaves the model exactly as it was.

Example:
    >>> import torch
    >>> from pruner.loop import estimate_importance
    >>> from pruner.config import PruneConfig
    >>> from pruner.structure import discover
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> batches = [torch.randint(3, 120, (1, 12)) for _ in range(2)]
    >>> cfg = PruneConfig(pruning_ratio=0.5, iterative_steps=2, prune_attention=False)
    >>> hooks = StepHooks(estimate=lambda m, s, c: (estimate_importance(m, batches, s, c), None))
    >>> plan = prune_steps(model, discover(model), cfg, hooks)
    >>> model.model.layers[0].mlp.up_proj.out_features  # 96 channels, 1 - 0.5 kept after two steps
    48
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import PrunerError
from ..memory import release_freed_memory
from ..refit.obs import select_heads_obs, select_mlp_obs
from ..refit.regional import MlpBranch, fitted_layers, mlp_branch
from ..refit.statistics import GramCollector
from ..refit.walk import Window, refit_layer_by_layer
from ..selection import candidate_pools, mark_removed, refine_attention, select_units, units_to_plan
from ..structure import LayerPlan, ModelStructure, Plan, Transaction, apply_plan, count_parameters, discover
from ..structure.spec import plain_config_problem
from ..version import package_version

Estimate = Callable[[nn.Module, ModelStructure, PruneConfig], tuple[dict, GramCollector | None]]


@dataclass
class StepHooks:
    """What the caller of :func:`prune_steps` supplies.

    Attributes:
        estimate: ``(model, structure, step_config) -> (vectors, fisher)``: the per-index
            importance vectors of the model as it is now (summed over ranks, if any) and, with
            ``mlp_selection="obs-fisher"``, the loss's output Fisher at each consumer (else None).
        refine_batches: calibration batches (dicts on the model's device) for
            ``attention_selection='measured'``.
        all_reduce: sums a tensor over ranks (the measured selection's losses, the regional fit's
            gradients); None = one process.
        reduce: sums a dict of tensors over ranks (each layer's refit statistics); None = one process.
        check: called with each step's plan and structure before any weight of that step
            changes (e.g. that every rank chose the same plan).
        before_surgery: called once with the dense model, just before the first weights change
            (e.g. to keep a distillation teacher).
        text: with ``reconstruct``, the refit's batches (dicts on the model's device; this rank's),
            walked layer by layer (:mod:`pruner.refit.walk`); ``fit_text``: the same tokens batched
            otherwise for the regional fit (empty: ``text``).
        window: ``model`` is a copy of a sharded model gathered one decoder layer at a time
            (:class:`pruner.refit.walk.Window`; ``reconstruct`` only): the walk holds each layer.
    """

    estimate: Estimate
    refine_batches: list[dict] = field(default_factory=list)
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    check: Callable[[Plan, ModelStructure], None] | None = None
    before_surgery: Callable[[nn.Module], None] | None = None
    text: list[dict] = field(default_factory=list)
    fit_text: list[dict] = field(default_factory=list)
    reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    window: Window | None = None


def prune_steps(model: nn.Module, dense_structure: ModelStructure, cfg: PruneConfig, hooks: StepHooks,
                first: tuple[dict, GramCollector | None] | None = None) -> Plan:
    """Prunes ``model`` in place in ``cfg.iterative_steps`` steps; returns the plan in dense
    indices, with the last step's group scores. ``first``: step 1's (vectors, collector) when
    the caller already has them (the callback accumulates them during the fit); otherwise
    ``hooks.estimate`` gives every step's. All steps are undone together if any step fails."""
    total_before = count_parameters(model)
    plan: Plan | None = None
    records: list[dict] = []
    structure = dense_structure
    branch = check_regional(model, dense_structure, cfg, hooks.text, hooks.window) if cfg.regional_epochs else None
    regional = None
    tx = Transaction()
    try:
        for step in range(1, cfg.iterative_steps + 1):
            step_cfg = step_config(cfg, step, total_before, count_parameters(model),
                                   dense_structure.layer_parameters())
            if step > 1:
                structure = discover(model, seed=cfg.seed)
            vectors, fisher = first if step == 1 and first is not None else hooks.estimate(model, structure,
                                                                                           step_cfg)
            step_plan = make_plan(structure, vectors, step_cfg, count_parameters(model))
            if cfg.uniform and step == cfg.iterative_steps:
                warn_if_uniform_widths_refused(step_plan, structure, model)
            if cfg.measures_attention and hooks.refine_batches:
                step_plan = refine_attention(model, structure, step_plan, hooks.refine_batches,
                                             all_reduce=hooks.all_reduce)
            if not cfg.reconstruct and hooks.check is not None:
                hooks.check(step_plan, structure)
            if step == 1 and hooks.before_surgery is not None:
                hooks.before_surgery(model)
            if cfg.reconstruct:  # OBS, refit, surgery (and the regional fit) one layer at a time
                step_plan, fit = refit_layer_by_layer(model, structure, step_plan, cfg, hooks.text, fisher, tx,
                                                      reduce=hooks.reduce, all_reduce=hooks.all_reduce,
                                                      check=hooks.check, fit_text=hooks.fit_text or None,
                                                      window=hooks.window, branch=branch)
                regional = fit or regional
            else:
                apply_plan(step_plan, model, structure, transaction=tx)
            records = step_plan.groups
            plan = step_plan if plan is None else compose(plan, step_plan, dense_structure)
    except BaseException:
        tx.rollback()
        raise
    tx.commit()
    release_freed_memory()  # the dense tensors the surgery replaced
    assert plan is not None
    plan.groups = records
    if regional is not None:
        plan.calibration["regional"] = regional
    return plan


def check_regional(model: nn.Module, structure: ModelStructure, cfg: PruneConfig, batches: list[dict],
                   window: Window | None = None) -> MlpBranch | None:
    """Before anything runs: ``regional_epochs`` has the refit's text, and the model's decoder
    layers add a multiple of their MLP's output (or of a norm of it) to the residual stream; returns
    how (:func:`~pruner.refit.regional.mlp_branch`: one short forward pass; with ``window``, the
    layer read is gathered for it), None when no layer is fitted."""
    if not batches:
        raise PrunerError("regional_epochs fits the pruned MLPs on the refit's text, but no text batches were given: "
                          "pass reconstruction_batches (or calibration batches), or set regional_epochs=0")
    layers = fitted_layers(structure, cfg)
    if not layers:
        return None
    with window.holding(layers[0]) if window is not None else nullcontext():
        return mlp_branch(model, structure, layers[0], batches[0])


def make_plan(structure: ModelStructure, vectors, cfg: PruneConfig, total_params: int) -> Plan:
    """Selection alone: per-index saliences -> the plan for the model ``structure`` describes
    (indices of that model), with every group's score and whether it goes in ``plan.groups``
    (one record per family: ``{"kind", "layer", "scores", "removed"}``).
    Deterministic: equal inputs give the same plan on every rank."""
    cfg.check_model(len(structure.layers))
    pools, records = candidate_pools(structure, vectors, cfg)
    chosen = select_units(pools, cfg, total_params, structure.layer_parameters())
    plan = units_to_plan(pools, chosen, structure)
    plan.groups = mark_removed(records, pools, chosen)
    plan.settings = cfg.to_dict()
    if cfg.uniform:
        check_uniform(plan, structure)
    return plan


def choose_within(plan: Plan, structure: ModelStructure, model: nn.Module, cfg: PruneConfig,
                  collector: GramCollector | None, refine_batches: list[dict] | None = None,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  obs_damping: float | None = None) -> Plan:
    """Which heads and MLP channels go, at the counts ``plan`` removes in each layer: re-chosen by
    the calibration loss (``attention_selection='measured'``, given ``refine_batches``) or by
    greedy OBS on ``collector``'s statistics (``'obs'``; MLP ``'obs'``/``'obs-fisher'``), else
    ``plan``'s own choice by score. ``obs_damping``: OBS's ridge term, by default the refit's
    (``cfg.reconstruct_damping``). Nothing in ``model`` changes.

    Example:
        >>> import torch
        >>> from pruner.loop import estimate_importance
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> structure = discover(model)
        >>> cfg = PruneConfig(pruning_ratio=0.5, prune_attention=False)
        >>> vectors = estimate_importance(model, [torch.randint(3, 120, (1, 12))], structure, cfg)
        >>> plan = make_plan(structure, vectors, cfg, count_parameters(model))
        >>> choose_within(plan, structure, model, cfg, None) is plan  # 'score': the plan's own choice
        True
    """
    if cfg.measures_attention and refine_batches:
        plan = refine_attention(model, structure, plan, refine_batches, all_reduce=all_reduce)
    damping = cfg.reconstruct_damping if obs_damping is None else obs_damping
    if cfg.attention_selection == "obs":  # the config guarantees reconstruct, hence the statistics
        plan = select_heads_obs(plan, structure, model, collector, damping)
    if cfg.mlp_selection in ("obs", "obs-fisher"):
        plan = select_mlp_obs(plan, structure, model, collector, damping,
                              fisher_weighted=cfg.mlp_selection == "obs-fisher")
    return plan


def check_uniform(plan: Plan, structure: ModelStructure) -> None:
    """Refuses a plan whose layers keep different widths (``uniform=True`` promised equal ones)."""
    kept = set()
    for lp, info in zip(plan.layers, structure.layers):
        heads = info.attention.num_heads if info.attention is not None else 0
        kv = info.attention.num_kv_heads if info.attention is not None else 0
        channels = info.mlp.num_channels if info.mlp is not None else 0
        kept.add((len(lp.heads_kept) if lp.heads_kept is not None else heads,
                  len(lp.kv_heads_kept) if lp.kv_heads_kept is not None else kv,
                  len(lp.mlp_channels_kept) if lp.mlp_channels_kept is not None else channels, lp.removed))
    if len(kept) > 1:
        raise PrunerError(f"uniform=True, but the layers would keep different (heads, KV heads, MLP channels): "
                          f"{sorted(kept)[:3]}; the dense layers differ in width, so no uniform plan exists here")


def step_config(cfg: PruneConfig, step: int, total_before: int, total_now: int,
                layers_before: int | None = None) -> PruneConfig:
    """Step ``k`` of ``n`` removes what takes the model to ``k/n`` of the final target (each
    step's target a fraction of the model as it is then). ``layers_before``: the dense decoder
    layers' parameters, the base of ``target_scope='layers'``."""
    if cfg.iterative_steps == 1:
        return cfg
    kw = cfg.to_dict()
    kw["iterative_steps"] = 1
    if cfg.target_sparsity is not None:
        share = cfg.target_sparsity * step / cfg.iterative_steps
        if cfg.target_scope == "layers":
            if layers_before is None:
                raise PrunerError("target_scope='layers' needs the dense decoder layers' parameter count")
            goal_after = total_before - share * layers_before
        else:
            goal_after = total_before * (1 - share)
        kw["target_sparsity"] = max(min((total_now - goal_after) / total_now, 0.999), 1e-9)
        kw["target_scope"] = "model"
    else:
        # ratio r in n steps: each step keeps (1-r)^(1/n) of what is left
        kept = (1 - cfg.pruning_ratio) ** (1 / cfg.iterative_steps)
        kw["pruning_ratio"] = 1 - kept
    return PruneConfig(**kw)


def finish_plan(plan: Plan, pruned_model: nn.Module, dense_structure: ModelStructure, fingerprint: str,
                total_before: int, cfg: PruneConfig, calibration: dict) -> Plan:
    """Records what a plan needs to be re-applied and reported: dense sizes and fingerprint,
    settings, exact parameter counts before/after, calibration summary, package version."""
    total_after = count_parameters(pruned_model)
    a = dense_structure.layers[0].attention
    m = dense_structure.layers[0].mlp
    plan.model = {
        "model_type": getattr(pruned_model.config, "model_type", None),
        "architecture": type(pruned_model).__name__,
        "num_hidden_layers": len(dense_structure.layers),
        "hidden_size": dense_structure.hidden_size,
        "num_attention_heads": a.num_heads if a else None,
        "num_key_value_heads": a.num_kv_heads if a else None,
        "head_dim": a.head_dim if a else None,
        "intermediate_size": m.num_channels if m else None,
        "fingerprint": fingerprint,
    }
    plan.settings = cfg.to_dict()
    layers_before = dense_structure.layer_parameters()
    layers_after = sum(p.numel() for p in pruned_model.get_submodule(dense_structure.layers_path).parameters())
    plan.params = {"before": total_before, "after": total_after, "removed": total_before - total_after,
                   "removed_fraction": (total_before - total_after) / total_before,
                   "layers_before": layers_before, "layers_after": layers_after,
                   "removed_layer_fraction": (layers_before - layers_after) / layers_before if layers_before else 0.0}
    warn_if_layers_gutted(plan.params, cfg)
    plan.calibration = {**calibration, **({"regional": plan.calibration["regional"]}
                                          if "regional" in plan.calibration else {})}
    plan.pruner_version = package_version()
    return plan


def warn_if_uniform_widths_refused(plan: Plan, structure: ModelStructure, model: nn.Module) -> None:
    """Before surgery: a uniform plan whose widths the model's config class refuses (its
    validators) is exported with per-layer widths, which load through pruner.load_pretrained or
    trust_remote_code only: said now, not at the export."""
    lp, info = plan.layers[0], structure.layers[0]
    a = info.attention
    if a is None or lp.removed:
        return
    values = {"num_attention_heads": len(lp.heads_kept) if lp.heads_kept is not None else a.num_heads,
              "num_key_value_heads": len(lp.kv_heads_kept) if lp.kv_heads_kept is not None else a.num_kv_heads,
              "head_dim": a.head_dim}
    if values["num_attention_heads"] == a.num_heads and values["num_key_value_heads"] == a.num_kv_heads:
        return  # the heads stay: the config describes them as it is
    consumer = a.consumer.replace(info.path, f"{structure.layers_path}.0", 1)
    problem = plain_config_problem(model, consumer, values)
    if problem is not None:
        warnings.warn(f"uniform=True keeps {values['num_attention_heads']} attention heads in every layer, which "
                      f"{type(model.config).__name__} cannot describe ({problem}): the export will carry per-layer "
                      "widths and load "
                      "through pruner.load_pretrained (or trust_remote_code), not as a plain config; choose a ratio "
                      "that keeps a head count dividing the hidden size for a plain one", stacklevel=3)


def warn_if_layers_gutted(params: dict, cfg: PruneConfig) -> None:
    """A target over all parameters that removed more than half of the decoder layers' (a small
    model whose embeddings are a large share) is named, with the layer-scope target it equals."""
    layers = params.get("removed_layer_fraction", 0.0)
    if cfg.target_sparsity is None or cfg.target_scope != "model" or layers <= 0.5:
        return
    share = params["layers_before"] / params["before"]
    warnings.warn(
        f"target_sparsity={cfg.target_sparsity} of ALL parameters removed {layers:.0%} of the decoder layers' "
        f"parameters: the layers are {share:.0%} of this model, the rest (embeddings, output layer) is not pruned. "
        f"That is target_scope='layers' with target_sparsity={layers:.2f}; to remove a fraction of the layers "
        f"instead, pass target_scope='layers' (e.g. target_sparsity=0.2)", stacklevel=3)


def _all(kept: list[int] | None, n: int) -> list[int]:
    return list(range(n)) if kept is None else list(kept)


def compose(base: Plan, step: Plan, dense: ModelStructure) -> Plan:
    """The plan that does ``base`` then ``step`` (``step`` indexes the model after ``base``)."""
    alive = [lp for lp in base.layers if not lp.removed]
    if len(alive) != len(step.layers):
        raise PrunerError("cannot compose plans: layer counts differ")
    layers = [LayerPlan(**vars(lp)) for lp in base.layers]
    by_index = {lp.index: lp for lp in layers}
    for b, s in zip(alive, step.layers):
        info = dense.layers[b.index]
        out = by_index[b.index]
        if s.removed:
            out.removed = True
            continue
        if info.attention is not None:
            a = info.attention
            kv = _all(b.kv_heads_kept, a.num_kv_heads)
            n_rep = a.num_heads // a.num_kv_heads
            heads = _all(b.heads_kept, a.num_heads) if b.heads_kept is not None else [
                h for h in range(a.num_heads) if h // n_rep in kv]
            if s.kv_heads_kept is not None or s.heads_kept is not None:
                out.kv_heads_kept = [kv[i] for i in _all(s.kv_heads_kept, len(kv))]
                out.heads_kept = [heads[i] for i in _all(s.heads_kept, len(heads))]
        if info.mlp is not None and s.mlp_channels_kept is not None:
            ch = _all(b.mlp_channels_kept, info.mlp.num_channels)
            out.mlp_channels_kept = [ch[i] for i in s.mlp_channels_kept]
    hidden = base.hidden_kept
    if step.hidden_kept is not None:
        h = _all(base.hidden_kept, dense.hidden_size)
        hidden = [h[i] for i in step.hidden_kept]
    return Plan(layers, hidden)


__all__ = ["StepHooks", "check_regional", "choose_within", "compose", "finish_plan", "make_plan", "prune_steps", "step_config"]
