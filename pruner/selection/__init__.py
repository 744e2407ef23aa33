"""Selection: group scores and a target -> which units go (a plan), and the measured choice of
which attention heads a layer loses.
"""

from .measured import refine_attention
from .units import (Pool, candidate_pools, check_prunable, cheapest_first, in_range, mark_removed,
                    select_units, units_to_plan)

__all__ = ["Pool", "candidate_pools", "check_prunable", "cheapest_first", "in_range", "mark_removed", "refine_attention",
           "select_units", "units_to_plan"]
