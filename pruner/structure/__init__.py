"""Structure: the coupled groups a model has, the plan of what goes, and its exact removal.

``discover`` finds the groups by probing, a :class:`Plan` (JSON) says which are kept, and
``apply_plan`` slices every coupled weight in one all-or-nothing transaction (``mask_plan``
zeroes them instead, for checks); ``shapes`` rebuilds pruned widths when a folder loads.
"""

from .groups import AttentionInfo, Family, LayerInfo, Member, MLPInfo, ModelStructure, consumer_columns
from .params import count_parameters, model_fingerprint
from .plan import LayerPlan, Plan, sync_group_records
from .discovery import discover, find_layer_stack
from .surgery import Transaction, apply_layer, apply_plan, check_plan, mask_plan, record_sizes, removed_slices

__all__ = [
    "AttentionInfo", "Family", "LayerInfo", "LayerPlan", "MLPInfo", "Member", "ModelStructure", "Plan", "Transaction",
    "apply_layer", "apply_plan", "check_plan", "record_sizes", "consumer_columns", "count_parameters", "discover", "find_layer_stack", "mask_plan",
    "model_fingerprint", "removed_slices", "sync_group_records",
]
