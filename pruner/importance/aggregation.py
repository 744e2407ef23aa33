"""Aggregators: per-member scores of a coupled group -> one score per group (a registry).

Members are ordered producers first and the consumer last (q/k/v rows, then o columns), so
``last`` scores a group by its consumer slice alone, like the reference's ``last`` reduction.

Example:
    >>> import torch
    >>> aggregate(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "sum").tolist()
    [4.0, 6.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import PrunerError

AGGREGATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda s: s.sum(0),
    "mean": lambda s: s.mean(0),
    "max": lambda s: s.max(0).values,
    # a product of hundreds of small scores underflows: rank by its logarithm (same order)
    "prod": lambda s: s.clamp_min(1e-300).log().sum(0),
    "last": lambda s: s[-1],
}


def check_aggregation(name: str) -> str:
    if name not in AGGREGATORS:
        raise PrunerError(f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATORS)}")
    return name


def aggregate(member_scores: torch.Tensor, name: str) -> torch.Tensor:
    """``member_scores``: (n_members, n_groups) -> (n_groups,)."""
    return AGGREGATORS[check_aggregation(name)](member_scores)
