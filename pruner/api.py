"""``pruner.prune``: calibration -> importance -> selection -> exact removal, in one call.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    >>> plan = prune(model, batches, target_sparsity=0.2)
    >>> round(plan.params["removed_fraction"], 2)
    0.2
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .discovery import ModelStructure, discover
from .errors import PrunerError
from .eval.efficiency import count_parameters  # one definition: tied weights counted once
from .importance import ImportanceEstimator
from .plan import LayerPlan, Plan, model_fingerprint
from .reconstruction import GramCollector, compensate, consumers, select_heads_obs, select_mlp_obs
from .refine import refine_attention
from .selection import _in, candidate_units, select_units, units_to_plan
from .surgery import apply_plan


def package_version() -> str:
    try:
        return version("pruner")
    except PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


def _as_batch(batch, device) -> dict[str, torch.Tensor]:
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise PrunerError("calibration batches must be input_ids tensors (B, T) or dicts holding 'input_ids'")
    ids = batch["input_ids"]
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise PrunerError(f"calibration input_ids must have shape (batch, tokens >= 2), got {tuple(ids.shape)}")
    out = {"input_ids": ids.to(device)}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device)
    labels = batch.get("labels")
    out["labels"] = (labels if labels is not None else ids).to(device)
    return out


def estimate_importance(model: nn.Module, batches: list, structure: ModelStructure, cfg: PruneConfig,
                        progress: bool = False, collector: GramCollector | None = None):
    """Runs the calibration batches and returns the per-index salience vectors. A ``collector``
    (for ``reconstruct``) records the consumers' input statistics during the same passes."""
    families = families_for(structure, cfg)
    est = ImportanceEstimator(model, families, cfg.criterion, cfg.seed)
    if cfg.criterion in ("l1", "l2", "random") and collector is None:
        return est.vectors()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: importance of the deterministic model
    est.attach()
    if collector is not None:
        collector.attach()
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            batch = _as_batch(batch, device)
            # second-order terms need one backward per sample
            samples = ([{k: v[i: i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
                       if est.criterion.needs_per_sample else [batch])
            for sample in samples:
                est.begin_batch(sample["input_ids"].shape[0])
                if est.criterion.needs_gradients:
                    loss = model(**sample).loss
                    if not torch.isfinite(loss):
                        raise PrunerError("calibration loss is NaN/inf: check the data and the model's dtype")
                    loss.backward()
                else:
                    with torch.no_grad():
                        model(**{k: v for k, v in sample.items() if k != "labels"})
    finally:
        est.detach()
        if collector is not None:
            collector.detach()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return est.vectors()


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: list, collector: GramCollector, progress: bool = False) -> None:
    """Forward passes only: the consumers' input statistics for ``reconstruct``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collector.attach()
    try:
        for batch in tqdm(batches, desc="reconstruction inputs", disable=not progress):
            batch = _as_batch(batch, device)
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        collector.detach()
        model.train(was_training)


def families_for(structure: ModelStructure, cfg: PruneConfig):
    """The group families whose importance ``cfg`` needs."""
    fams = []
    if cfg.mode == "block":
        for info in structure.layers:
            if info.attention is not None and cfg.prunes("attention", info.index):
                fams += [info.attention.heads, info.attention.kv_groups]
            if info.mlp is not None and cfg.prunes("mlp", info.index):
                fams.append(info.mlp.channels)
    elif cfg.mode == "channel":
        fams.append(structure.hidden_family())
    else:
        fams += [structure.layer_family(info) for info in structure.layers if _in(cfg.layers, info.index)]
    return fams


def prune(
    model: nn.Module,
    batches: Iterable,
    *,
    criterion: str = "element1",
    aggregation: str = "sum",
    mode: str = "block",
    target_sparsity: float | None = None,
    pruning_ratio: float | None = None,
    attention_layers: tuple[int, int] | None = None,
    mlp_layers: tuple[int, int] | None = None,
    progress: bool = False,
    reconstruction_batches: Iterable | None = None,
    **more,
) -> Plan:
    """Prunes ``model`` in place and returns the :class:`Plan` (indices of the dense model).

    ``batches``: input_ids tensors (B, T) or dicts holding ``input_ids``. ``target_sparsity``:
    fraction of total parameters to remove; ``pruning_ratio``: the paper's per-structure ratio.
    ``attention_layers`` / ``mlp_layers``: half-open layer ranges. Further options are the
    fields of :class:`pruner.config.PruneConfig` (``layers``, ``head_granularity``,
    ``global_ranking``, ``max_layer_ratio``, ``round_to``, ``iterative_steps``, ``seed``,
    ``reconstruct``, ``reconstruct_damping``, ``attention_selection``, ``mlp_selection``).
    ``reconstruction_batches``: with ``reconstruct``, the inputs whose statistics the refit uses
    (forward passes only, so many more tokens than the calibration batches are affordable);
    None = the calibration batches.
    Every argument is checked before the model is touched.
    """
    unknown = set(more) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise PrunerError(f"unknown prune() option(s) {sorted(unknown)}; valid: {sorted(PruneConfig.__dataclass_fields__)}")
    cfg = PruneConfig(criterion=criterion, aggregation=aggregation, mode=mode, target_sparsity=target_sparsity,
                      pruning_ratio=pruning_ratio, attention_layers=attention_layers, mlp_layers=mlp_layers, **more)
    device = next(model.parameters()).device
    batches = [_as_batch(b, device) for b in batches]  # validated and normalised once, up front
    extra = list(reconstruction_batches) if reconstruction_batches is not None else None
    if extra is not None and not cfg.reconstruct:
        raise PrunerError("reconstruction_batches are only used with reconstruct=True: set it, or drop them")
    if extra is not None and not extra:
        raise PrunerError("reconstruction_batches is empty: pass input_ids batches, or None to reuse the calibration")
    if not batches and cfg.criterion not in ("l1", "l2", "random"):
        raise PrunerError(f"no calibration batches: criterion {cfg.criterion!r} needs at least one; pass "
                          "input_ids batches, or use a data-free criterion (l1, l2, random)")
    dense_structure = discover(model, seed=cfg.seed)
    cfg.check_model(len(dense_structure.layers))
    total_before = count_parameters(model)
    fingerprint = model_fingerprint(model)
    plan: Plan | None = None
    records: list[dict] = []
    structure = dense_structure
    for step in range(1, cfg.iterative_steps + 1):
        step_cfg = _step_config(cfg, step, total_before, count_parameters(model))
        if step > 1:
            structure = discover(model, seed=cfg.seed)
        collector = GramCollector(model, consumers(structure, cfg)) if cfg.reconstruct else None
        vectors = estimate_importance(model, batches, structure, step_cfg, progress,
                                      collector if extra is None else None)
        if collector is not None and extra is not None:
            collect_inputs(model, extra, collector, progress)
        step_plan = make_plan(structure, vectors, step_cfg, count_parameters(model))
        if cfg.measures_attention and batches:
            step_plan = refine_attention(model, structure, step_plan, batches)
        if cfg.attention_selection == "obs":  # config checks guarantee the collector
            step_plan = select_heads_obs(step_plan, structure, model, collector, cfg.reconstruct_damping)
        if cfg.mlp_selection == "obs":
            step_plan = select_mlp_obs(step_plan, structure, model, collector, cfg.reconstruct_damping)
        records = step_plan.groups
        if collector is not None:
            compensate(step_plan, structure, model, collector, cfg.reconstruct_damping)
        apply_plan(step_plan, model, structure)
        plan = step_plan if plan is None else compose(plan, step_plan, dense_structure)
    assert plan is not None
    plan.groups = records
    calibration = {"batches": len(batches), "samples": sum(b["input_ids"].shape[0] for b in batches),
                   "tokens_per_sample": int(batches[0]["input_ids"].shape[1]) if batches else 0}
    if extra is not None:
        calibration["reconstruction_tokens"] = sum(_as_batch(b, "cpu")["input_ids"].numel() for b in extra)
    return finish_plan(plan, model, dense_structure, fingerprint, total_before, cfg, calibration)


def finish_plan(plan: Plan, pruned_model: nn.Module, dense_structure: ModelStructure, fingerprint: str,
                total_before: int, cfg: PruneConfig, calibration: dict) -> Plan:
    """Records what a plan needs to be re-applied and reported: dense sizes and fingerprint,
    settings, exact parameter counts before/after, calibration summary, package version."""
    total_after = count_parameters(pruned_model)
    plan.model = _model_summary(pruned_model, dense_structure, fingerprint)
    plan.settings = cfg.to_dict()
    plan.params = {"before": total_before, "after": total_after, "removed": total_before - total_after,
                   "removed_fraction": (total_before - total_after) / total_before}
    plan.calibration = calibration
    plan.pruner_version = package_version()
    return plan


def make_plan(structure: ModelStructure, vectors, cfg: PruneConfig, total_params: int) -> Plan:
    """Selection alone: per-index saliences -> the plan for the model ``structure`` describes
    (indices of that model), with every group's score and whether it goes in ``plan.groups``.
    Deterministic: equal inputs give the same plan on every rank."""
    pools, records = candidate_units(structure, vectors, cfg)
    units = select_units(pools, cfg, total_params)
    plan = units_to_plan(units, structure)
    _mark_removed(records, units)
    plan.groups = records
    plan.settings = cfg.to_dict()
    return plan


def _step_config(cfg: PruneConfig, step: int, total_before: int, total_now: int) -> PruneConfig:
    """Step ``k`` of ``n`` removes what takes the model to ``k/n`` of the final target."""
    if cfg.iterative_steps == 1:
        return cfg
    kw = cfg.to_dict()
    kw["iterative_steps"] = 1
    if cfg.target_sparsity is not None:
        goal_after = total_before * (1 - cfg.target_sparsity * step / cfg.iterative_steps)
        kw["target_sparsity"] = max(min((total_now - goal_after) / total_now, 0.999), 1e-9)
    else:
        # ratio r in n steps: each step keeps (1-r)^(1/n) of what is left
        kept = (1 - cfg.pruning_ratio) ** (1 / cfg.iterative_steps)
        kw["pruning_ratio"] = 1 - kept
    return PruneConfig(**kw)


def _mark_removed(records: list[dict], units) -> None:
    kind_of = {"heads": "attention_head", "kv": "kv_group", "mlp": "mlp_channel", "hidden": "hidden_channel",
               "layer": "layer"}
    gone = {(kind_of[u.kind], u.layer, i) for u in units for i in u.items}
    for r in records:
        r["removed"] = (r["kind"], r["layer"], r["index"]) in gone


def _model_summary(model, structure: ModelStructure, fingerprint: str) -> dict:
    cfg = model.config
    a = structure.layers[0].attention
    m = structure.layers[0].mlp
    return {
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(model).__name__,
        "num_hidden_layers": len(structure.layers),
        "hidden_size": structure.hidden_size,
        "num_attention_heads": a.num_heads if a else None,
        "num_key_value_heads": a.num_kv_heads if a else None,
        "head_dim": a.head_dim if a else None,
        "intermediate_size": m.num_channels if m else None,
        "fingerprint": fingerprint,
    }


def _full(kept: list[int] | None, n: int) -> list[int]:
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
            kv = _full(b.kv_heads_kept, a.num_kv_heads)
            n_rep = a.num_heads // a.num_kv_heads
            heads = _full(b.heads_kept, a.num_heads) if b.heads_kept is not None else [
                h for h in range(a.num_heads) if h // n_rep in kv]
            if s.kv_heads_kept is not None or s.heads_kept is not None:
                out.kv_heads_kept = [kv[i] for i in _full(s.kv_heads_kept, len(kv))]
                out.heads_kept = [heads[i] for i in _full(s.heads_kept, len(heads))]
        if info.mlp is not None and s.mlp_channels_kept is not None:
            ch = _full(b.mlp_channels_kept, info.mlp.num_channels)
            out.mlp_channels_kept = [ch[i] for i in s.mlp_channels_kept]
    hidden = base.hidden_kept
    if step.hidden_kept is not None:
        h = _full(base.hidden_kept, dense.hidden_size)
        hidden = [h[i] for i in step.hidden_kept]
    return Plan(layers, hidden)
