"""The weight-distance baseline (Git Re-Basin style, layer by layer)."""

from __future__ import annotations

from .base import PairMethod, PairProblem, Pairs, register


@register
class L2(PairMethod):
    """Half the squared distance of the incoming weights over the shared inputs, bias included."""

    name = "l2"
    tie_metric = "l2"

    def choose(self, problem: PairProblem) -> Pairs:
        return problem.matched(problem.summed_costs(self.name))
