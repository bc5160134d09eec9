"""MTZ's pair choice: the functional difference of Eq. 12 under the layer-wise Hessians."""

from __future__ import annotations

from .base import PairMethod, PairProblem, Pairs, register


@register
class Hessian(PairMethod):
    """d(i, j) = 1/2 (a_i - b_j)^T M (a_i - b_j), M = (H_A^-1 + H_B^-1)^-1, summed over the writers."""

    name = "hessian"

    def choose(self, problem: PairProblem) -> Pairs:
        return problem.matched(problem.summed_costs(self.name))
