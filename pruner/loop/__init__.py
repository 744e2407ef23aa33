"""The pruning loop: the calibration pass, the steps (select -> refine/OBS -> refit -> regional ->
remove) and ``pruner.prune``, which drives them over the caller's batches.
"""

from .calibration import estimate_importance, families_for
from .prune import prune
from .steps import StepHooks, choose_within, compose, finish_plan, make_plan, prune_steps, step_config

__all__ = ["StepHooks", "choose_within", "compose", "estimate_importance", "families_for", "finish_plan",
           "make_plan", "prune", "prune_steps", "step_config"]
