"""``pruner.prune``: calibration -> importance -> selection -> exact removal, in one call.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    >>> plan = prune(model, batches, target_sparsity=0.2, global_ranking=True)
    >>> round(plan.params["removed_fraction"], 2)  # of ALL parameters, embeddings included
    0.2
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..batches import MICRO_BATCH_TOKENS, as_batch, check_inputs
from ..checks import check_int, check_model
from ..config import PruneConfig
from ..errors import PrunerError
from ..structure import Plan
from .session import PruneSession, check_data


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
    max_tokens_per_backward: int | None = MICRO_BATCH_TOKENS,
    activation_checkpointing: bool = False,
    **more,
) -> Plan:
    """Prunes ``model`` in place and returns the :class:`Plan` (indices of the dense model).

    ``batches``: input_ids tensors (B, T) or dicts holding ``input_ids``. ``target_sparsity``:
    fraction of parameters to remove, of all of them (``target_scope="model"``, the default) or
    of the decoder layers' (``target_scope="layers"``: for small models whose embeddings are a
    large share); ``pruning_ratio``: the paper's per-structure ratio.
    ``attention_layers`` / ``mlp_layers``: half-open layer ranges. Further options are the
    fields of :class:`pruner.config.PruneConfig` (``layers``, ``head_granularity``,
    ``global_ranking``, ``max_layer_ratio``, ``round_to``, ``iterative_steps``, ``seed``,
    ``reconstruct``, ``reconstruct_damping``, ``attention_selection``, ``mlp_selection``,
    ``regional_epochs``, ``regional_lr``).
    ``reconstruction_batches``: with ``reconstruct``, the inputs whose statistics the refit uses
    (forward passes only, so many more tokens than the calibration batches are affordable);
    None = the calibration batches. ``max_tokens_per_backward``: calibration batches run in
    backward passes of at most this many tokens (whole samples; the scores are the whole
    batch's), which bounds the memory; None = one backward per batch.
    ``activation_checkpointing``: the calibration backward keeps only each decoder layer's input
    and recomputes the layer when its gradient is due: the same scores for one more forward
    pass, and activation memory that no longer grows with the depth (with the paper's one
    backward, ``max_tokens_per_backward=None``, the largest share of what pruning adds).
    Every argument is checked before the model is touched, and a failure at any later point
    leaves the model as it was.
    """
    check_model(model)
    if max_tokens_per_backward is not None:
        check_int("max_tokens_per_backward", max_tokens_per_backward, 1, fix="or None for one backward per batch")
    if not isinstance(activation_checkpointing, bool):
        raise PrunerError(f"activation_checkpointing={activation_checkpointing!r} must be True or False")
    if batches is None or isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise PrunerError(f"batches must be an iterable of calibration batches (input_ids tensors or dicts), got "
                          f"{type(batches).__name__}: e.g. [pruner.data.calibration_samples(...)]")
    unknown = set(more) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise PrunerError(f"unknown prune() option(s) {sorted(unknown)}; valid: {sorted(PruneConfig.__dataclass_fields__)}")
    cfg = PruneConfig(criterion=criterion, aggregation=aggregation, mode=mode, target_sparsity=target_sparsity,
                      pruning_ratio=pruning_ratio, attention_layers=attention_layers, mlp_layers=mlp_layers, **more)
    device = next(model.parameters()).device
    batches = [as_batch(b, device) for b in batches]  # validated and normalised once, up front
    for i, b in enumerate(batches):
        check_inputs(b, model.config, f"calibration batch {i}")
    extra = list(reconstruction_batches) if reconstruction_batches is not None else None
    if extra is not None and not cfg.reconstruct:
        raise PrunerError("reconstruction_batches are only used with reconstruct=True: set it, or drop them")
    if extra is not None and not extra:
        raise PrunerError("reconstruction_batches is empty: pass input_ids batches, or None to reuse the calibration")
    for i, b in enumerate(extra or []):
        check_inputs(as_batch(b, "cpu"), model.config, f"reconstruction batch {i}")
    check_data(cfg, calibration=bool(batches), reconstruction=bool(extra))
    session = PruneSession(model, cfg, calibration_batches=batches, reconstruction_batches=extra,
                           max_tokens_per_backward=max_tokens_per_backward, progress=progress,
                           activation_checkpointing=activation_checkpointing)
    return session.prune(model)
