"""LoRA adapters added to a model *in place* (peft), and merged back in place.

The model object stays the same: its target ``nn.Linear`` modules are replaced by peft's LoRA
layers (the base weights frozen, only the adapters trainable), so code that holds the model
(``self.model(**batch)`` in a user's LightningModule) keeps working unchanged. No
``PeftModel`` wrapper is involved, so parameter names are the model's own plus
``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default``.

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> attach_lora(model, LoraSettings(r=4, target_modules=("q_proj", "v_proj")))
    >>> has_lora(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    (True, 2688)
    >>> merge_lora(model)
    >>> has_lora(model), type(model.model.layers[0].self_attn.q_proj).__name__
    (False, 'Linear')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..checks import plain
from ..errors import PrunerError

# LLM-Pruner's targets: every projection of attention and MLP.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (LLM-Pruner's defaults: rank 8, alpha 16, dropout 0.05, all seven
    projections). ``target_modules`` are module names or their last dotted parts (peft's rule)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "dropout"):  # NumPy scalars as Python numbers
            object.__setattr__(self, name, plain(getattr(self, name)))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise PrunerError(f"LoRA rank r={self.r!r} must be an integer >= 1 (LLM-Pruner uses 8)")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise PrunerError(f"LoRA alpha={self.alpha!r} must be a positive number (LLM-Pruner uses 16)")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise PrunerError(f"LoRA dropout={self.dropout!r} must be a number in [0, 1) (LLM-Pruner uses 0.05)")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise PrunerError(f"LoRA target_modules={targets!r} must be a non-empty list of linear-layer names, "
                              "e.g. [q_proj, v_proj]; leave it unset for all seven projections")
        object.__setattr__(self, "target_modules", tuple(targets))

    def peft_config(self):
        """The ``peft.LoraConfig`` of these settings."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def check_merged(model: nn.Module, action: str) -> None:
    """Refuses ``action`` (saving, exporting) on a model that still holds LoRA adapters."""
    if has_lora(model):
        raise PrunerError(f"the model still holds LoRA adapters: merge them first "
                          f"(pruner.recovery.merge_lora(model)), then {action}")


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft tuner layers (LoRA or any other adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def missing_targets(model: nn.Module, targets: Sequence[str], removed_prefixes: Sequence[str] = ()) -> list[str]:
    """The ``targets`` that match no ``nn.Linear`` of ``model`` (peft's rule: the full name or its
    last dotted parts), ignoring modules under ``removed_prefixes`` (layers a plan deletes)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(n == p or n.startswith(p + ".") for p in removed_prefixes)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def attach_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Adds LoRA adapters to ``model`` in place; every other parameter stops requiring gradients.
    An optimizer built before this call must be rebuilt (it holds the old parameter list)."""
    from peft.tuners.lora import LoraModel

    if has_lora(model):
        raise PrunerError(f"{type(model).__name__} already has adapters: merge them (pruner.recovery.lora.merge_lora) "
                          "before attaching LoRA again")
    gone = missing_targets(model, settings.target_modules)
    if gone:
        raise PrunerError(f"LoRA target(s) {gone} match no linear layer of {type(model).__name__}: use names of its "
                          "projections (e.g. q_proj, v_proj), or leave target_modules unset for all seven")
    LoraModel(model, settings.peft_config(), "default")  # injects the layers into ``model`` itself


def merge_lora(model: nn.Module) -> None:
    """Folds every LoRA delta into its base weight and puts the plain base layers back, in place.
    All parameters stay frozen afterwards (``requires_grad_(True)`` to train them again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise PrunerError(f"{type(model).__name__} has no LoRA adapters to merge")
    for name, layer in layers:
        layer.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.get_base_layer())
    if "peft_config" in vars(model):  # peft's bookkeeping on the injected model
        del model.peft_config
