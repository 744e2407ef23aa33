"""Structure: the coupled groups a model has, the plan of what goes, and its exact removal.

``discover`` finds the groups by probing, a :class:`Plan` (JSON) says which are kept, and
``apply_plan`` slices every coupled weight in one all-or-nothing transaction (``mask_plan``
zeroes them instead, for checks); ``shapes`` rebuilds pruned widths when a folder loads.
"""

from .groups import AttentionInfo, Family, LayerInfo, Member, MLPInfo, ModelStructure, consumer_columns
from .params import count_parameters, model_fingerprint
from .plan import LayerPlan, Plan, sync_group_records
from .discovery import discover
from .layers import find_layer_stack, probed_layers
from .surgery import (Source, Transaction, apply_layer, apply_plan, check_plan, kept_layer_name, mask_plan,
                      pruned_sources, record_sizes, removed_slices)

__all__ = [
    "AttentionInfo", "Family", "LayerInfo", "LayerPlan", "MLPInfo", "Member", "ModelStructure", "Plan", "Source", "Transaction",
    "apply_layer", "apply_plan", "check_plan", "record_sizes", "consumer_columns", "count_parameters", "discover", "find_layer_stack", "kept_layer_name", "mask_plan", "probed_layers",
    "model_fingerprint", "pruned_sources", "removed_slices", "sync_group_records",
]
