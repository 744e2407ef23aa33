"""Lightning callbacks of the pruner package (installed as ``pruner.callbacks``).

Example:
    >>> from pruner.callbacks import StructuralPruneCallback
    >>> StructuralPruneCallback(target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28)).config.mode
    'block'
"""

from .pruning import StructuralPruneCallback
from .resume import load_pruned_checkpoint

__all__ = ["StructuralPruneCallback", "load_pruned_checkpoint"]
