"""Importance criteria: a registry that maps a name to the object that computes the score.

A criterion turns what the :class:`~pruner.importance.ImportanceEstimator` accumulated for one
parameter (its :class:`ParameterStatistics`) into per-index saliences along a group dimension
(:meth:`Criterion.index_salience`), and a family's per-index saliences into one score per group
(:meth:`Criterion.group_scores`). Its class attributes tell the estimator what to accumulate:
gradient sums, per-sample Fisher terms, input-channel energies, or nothing (magnitude).

A new criterion is one class::

    @register_criterion
    class Snip(Criterion):
        name, help = "snip", "|w * dL/dw| normalised per layer"
        needs_gradients = sums_gradients = True

        def element_salience(self, stats):
            return (stats.grad_sum / stats.samples).mul_(stats.weight).abs_()

Example:
    >>> CRITERIA["element1"].needs_gradients, CRITERIA["element2"].needs_per_sample
    (True, True)
    >>> sorted(CRITERIA)
    ['activation', 'element1', 'element2', 'l1', 'l2', 'mix', 'random', 'vector']
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import PrunerError
from ..structure import Family
from .aggregation import aggregate


@dataclass
class ParameterStatistics:
    """What calibration accumulated for one parameter (this rank's shard under FSDP2)."""

    weight: torch.Tensor  # fp32
    samples: int  # calibration samples the sums run over
    grad_sum: torch.Tensor | None = None  # Σ over samples of dL/dw (fp32, the weight's shape)
    fisher_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # dim -> Σ w²g² over samples and other dims
    input_sq_sum: torch.Tensor | None = None  # (in,) Σ x² of the Linear's input channels over tokens
    input_tokens: int = 0


def reduce_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums a parameter-shaped tensor over every dimension except ``dim``."""
    if t.dim() == 1:
        return t
    return t.sum(dim=[d for d in range(t.dim()) if d != dim])


class Criterion:
    """Base class: by default a criterion scores per element (:meth:`element_salience`, computed
    once per parameter) and sums the elements along every other dimension."""

    name: ClassVar[str]
    help: ClassVar[str]
    needs_gradients: ClassVar[bool] = False  # calibration runs backward passes
    sums_gradients: ClassVar[bool] = False  # keeps Σ dL/dw per scored weight (first order)
    needs_per_sample: ClassVar[bool] = False  # per-sample Fisher terms: calibration batches of one sample
    needs_activations: ClassVar[bool] = False  # input-channel energies from forward passes

    def element_salience(self, stats: ParameterStatistics) -> torch.Tensor | None:
        """A salience per element of the weight, or None where :meth:`index_salience` needs none."""
        return None

    def index_salience(self, stats: ParameterStatistics, element: torch.Tensor | None, dim: int) -> torch.Tensor:
        """The salience of each index of ``dim`` (fp32, ``(size of dim,)``)."""
        return reduce_except(element, dim)

    def member_score(self, summed: torch.Tensor) -> torch.Tensor:
        """A group member's score from the sum of its indices' saliences."""
        return summed

    def group_scores(self, family: Family, vectors: dict[tuple[str, int], torch.Tensor], aggregation: str,
                     seed: int) -> torch.Tensor:
        """One score per group of ``family`` (higher = more important), fp64."""
        per_member = []
        for m in family.members:
            v = vectors[(m.param, m.dim)].double().to(m.indices.device)
            per_member.append(self.member_score(v[m.indices].sum(-1)))  # (n_groups,)
        return aggregate(torch.stack(per_member), aggregation)  # (n_members, n_groups) -> (n_groups,)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: ``CRITERIA[cls.name]`` becomes an instance of ``cls``."""
    CRITERIA[cls.name] = cls()
    return cls


def check_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise PrunerError(f"unknown criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def _mean_first_order(stats: ParameterStatistics) -> torch.Tensor:
    return (stats.grad_sum / stats.samples).mul_(stats.weight)  # w * E[dL/dw], one temporary


@register_criterion
class FirstOrderTaylor(Criterion):
    name, help = "element1", "first-order Taylor, sum over elements of |w * dL/dw| (paper default)"
    needs_gradients = sums_gradients = True

    def element_salience(self, stats):
        return _mean_first_order(stats).abs_()


@register_criterion
class SecondOrderTaylor(Criterion):
    name, help = "element2", "second-order Taylor with the Fisher (squared-gradient) Hessian: 1/2 w^2 E[g^2]"
    needs_gradients = needs_per_sample = True

    def index_salience(self, stats, element, dim):
        return 0.5 * stats.fisher_sums[dim] / stats.samples


@register_criterion
class MixedTaylor(Criterion):
    name, help = "mix", "first + second order: |w g| + 1/2 w^2 E[g^2] per element"
    needs_gradients = sums_gradients = needs_per_sample = True

    def element_salience(self, stats):
        return _mean_first_order(stats).abs_()

    def index_salience(self, stats, element, dim):
        return reduce_except(element, dim) + 0.5 * stats.fisher_sums[dim] / stats.samples


@register_criterion
class VectorTaylor(Criterion):
    name, help = "vector", "whole-structure first-order Taylor |sum(w * dL/dw)|"
    needs_gradients = sums_gradients = True

    def element_salience(self, stats):
        return _mean_first_order(stats)  # signed: the structure's sum is taken before the absolute value

    def member_score(self, summed):
        return summed.abs()


@register_criterion
class L1Magnitude(Criterion):
    name, help = "l1", "magnitude: sum |w|"

    def index_salience(self, stats, element, dim):
        return reduce_except(stats.weight.abs(), dim)


@register_criterion
class L2Magnitude(Criterion):
    name, help = "l2", "magnitude: sqrt(sum w^2)"

    def index_salience(self, stats, element, dim):
        return reduce_except(stats.weight.square(), dim)

    def member_score(self, summed):
        return summed.sqrt()


@register_criterion
class RandomScores(Criterion):
    name, help = "random", "random scores (seeded): a baseline"

    def index_salience(self, stats, element, dim):
        return torch.zeros(stats.weight.shape[dim])  # the scores are drawn per group

    def group_scores(self, family, vectors, aggregation, seed):
        # a stable hash: Python's hash() of a str changes with PYTHONHASHSEED, i.e. in every process
        key = hashlib.sha256(f"{seed}:{family.kind}:{family.layer}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:4], "little"))
        return torch.rand(family.num_groups, generator=g, dtype=torch.float64)


@register_criterion
class ActivationWeighted(Criterion):
    name, help = "activation", "gradient-free, Wanda/FLAP style: |w| * ||x|| of the input channel"
    needs_activations = True

    def index_salience(self, stats, element, dim):
        w = stats.weight
        if stats.input_sq_sum is not None and w.dim() == 2:
            norm = (stats.input_sq_sum / max(stats.input_tokens, 1)).sqrt()  # (in,)
            return reduce_except(w.abs() * norm.unsqueeze(0), dim)
        # parameters without a recorded input (norms, embeddings, biases): magnitude
        return reduce_except(w.abs(), dim)


def family_scores(family: Family, vectors: dict[tuple[str, int], torch.Tensor], criterion: str,
                  aggregation: str = "sum", seed: int = 0) -> torch.Tensor:
    """One score per group of ``family`` (higher = more important), fp64."""
    return check_criterion(criterion).group_scores(family, vectors, aggregation, seed)
