"""The activation baseline (ZipIt style): 1 - correlation of the units' pre-activations."""

from __future__ import annotations

from .base import PairMethod, PairProblem, Pairs, register


@register
class Correlation(PairMethod):
    """Compares the units of the layer where a space is paired on the same samples: one calibration source,
    two tasks."""

    name = "correlation"
    same_calibration = True
    max_tasks = 2

    def choose(self, problem: PairProblem) -> Pairs:
        return problem.matched(problem.activation_costs())
