"""Recovery after pruning: LoRA adapters (peft) attached and merged in place, and the
distillation loss against the dense model.
"""

from .distillation import distillation_loss
from .lora import DEFAULT_TARGETS, LoraSettings, attach_lora, has_lora, merge_lora

__all__ = ["DEFAULT_TARGETS", "LoraSettings", "attach_lora", "distillation_loss", "has_lora", "merge_lora"]
