"""The paper's random-sharing baseline: pairs drawn at random, reproducibly from --seed."""

from __future__ import annotations

from ..match import random_group_pairs, random_pairs
from .base import PairMethod, PairProblem, Pairs, register


@register
class Random(PairMethod):
    """k units of each side drawn without replacement; their reported cost is MTZ's."""

    name = "random"
    thresholdable = False

    def choose(self, problem: PairProblem) -> Pairs:
        n_a, n_b = problem.A[0].shape[1], problem.B[0].shape[1]
        if problem.groups is None:
            rows, cols = random_pairs(n_a, n_b, problem.count, problem.seed)
        else:
            rows, cols = random_group_pairs(n_a, n_b, problem.count, problem.groups, problem.seed)
        return rows, cols, problem.costs_of(rows, cols, "hessian")
