"""Refit without training the model: the statistics of the refit's text, the least-squares refit
of the consumers, Optimal Brain Surgeon choice of what goes, and the regional fit of each pruned
layer's MLP.
"""

from .least_squares import compensate
from .obs import greedy_obs, select_heads_obs, select_mlp_obs
from .regional import fitted_layers, regional_fit, target_modules
from .statistics import GramCollector, collect_inputs, collect_output_fisher, consumers

__all__ = ["GramCollector", "collect_inputs", "collect_output_fisher", "compensate", "consumers", "fitted_layers",
           "greedy_obs", "regional_fit", "select_heads_obs", "select_mlp_obs", "target_modules"]
