"""pruner: structural pruning of LLaMA-class causal LMs (LLM-Pruner) for PyTorch / Lightning.

Example:
    >>> import pruner  # doctest: +SKIP
    >>> model, tokenizer = pruner.load_model("smollm2")  # doctest: +SKIP
    >>> plan = pruner.prune(model, batches, target_sparsity=0.2, attention_layers=(4, 28),
    ...                     mlp_layers=(4, 28))  # doctest: +SKIP
    >>> pruner.save_pretrained(model, "smollm2-pruned", tokenizer=tokenizer, plan=plan)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .api import count_parameters, estimate_importance, prune
from .config import PruneConfig
from .discovery import ModelStructure, discover
from .io import load_pretrained, save_pretrained
from .gguf_export import export_gguf
from .errors import PlanMismatchError, PrunerError, UnsupportedArchitectureError
from .models import load_model
from .plan import LayerPlan, Plan
from .surgery import apply_plan, mask_plan

__all__ = [
    "LayerPlan", "ModelStructure", "Plan", "PlanMismatchError", "PruneConfig", "PrunerError",
    "UnsupportedArchitectureError", "apply_plan", "count_parameters", "discover", "estimate_importance",
    "export_gguf", "load_model", "load_pretrained", "mask_plan", "prune", "save_pretrained",
]
