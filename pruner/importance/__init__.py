"""Importance: criteria (a registry), the estimator that accumulates them during calibration, and
the aggregation of a group's member scores into one score.
"""

from .aggregation import AGGREGATORS, aggregate, check_aggregation
from .criteria import CRITERIA, Criterion, ParameterStatistics, check_criterion, family_scores, register_criterion
from .estimator import ImportanceEstimator

__all__ = ["AGGREGATORS", "CRITERIA", "Criterion", "ImportanceEstimator", "ParameterStatistics", "aggregate",
           "check_aggregation", "check_criterion", "family_scores", "register_criterion"]
