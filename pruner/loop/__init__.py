"""The pruning loop: one :class:`PruneSession` (calibration state -> select -> refine/OBS -> refit ->
regional fit -> remove) that ``pruner.prune`` drives over the caller's batches and
``StructuralPruneCallback`` drives from its hooks.
"""

from .calibration import estimate_importance, families_for
from .session import PruneSession, Ranks, calibration_reruns
from .steps import StepHooks, choose_within, compose, finish_plan, make_plan, prune_steps, step_config
from .prune import prune

__all__ = ["PruneSession", "Ranks", "StepHooks", "calibration_reruns", "choose_within", "compose",
           "estimate_importance", "families_for", "finish_plan", "make_plan", "prune", "prune_steps", "step_config"]
