"""pruner: structural pruning of LLaMA-class causal LMs (LLM-Pruner) for PyTorch / Lightning.

The subpackages follow the pipeline: ``structure`` (groups, plan, surgery) -> ``importance``
(criteria, estimator) -> ``selection`` -> ``refit`` (least squares, OBS, regional fit) ->
``loop`` (``prune`` and the :class:`~pruner.loop.PruneSession` it shares with the Lightning
callback); ``io``, ``data``, ``recovery``, ``distributed`` and ``eval`` serve them.

Example:
    >>> import pruner  # doctest: +SKIP
    >>> model, tokenizer = pruner.load_model("smollm2")  # doctest: +SKIP
    >>> plan = pruner.prune(model, batches, target_sparsity=0.2, attention_layers=(4, 28),
    ...                     mlp_layers=(4, 28))  # doctest: +SKIP
    >>> pruner.save_pretrained(model, "smollm2-pruned", tokenizer=tokenizer, plan=plan)  # doctest: +SKIP
"""

from .version import __version__
from . import moved  # old module paths (pruner.api, pruner.io.models, ...) still import, with a warning
from .config import PruneConfig
from .errors import PlanMismatchError, PrunerError, UnsupportedArchitectureError
from .io import export_gguf, load_model, load_pretrained, save_pretrained
from .loop import estimate_importance, prune
from .structure import LayerPlan, ModelStructure, Plan, apply_plan, count_parameters, discover, mask_plan

moved.install()

__all__ = [
    "LayerPlan", "ModelStructure", "Plan", "PlanMismatchError", "PruneConfig", "PrunerError",
    "UnsupportedArchitectureError", "__version__", "apply_plan", "count_parameters", "discover", "estimate_importance",
    "export_gguf", "load_model", "load_pretrained", "mask_plan", "prune", "save_pretrained",
]
