"""Pair-choice methods behind a registry: each method is one small class in its own file that
says how it chooses the pairs of one unit space and what it needs (the same calibration data for
every task, chain networks, at most two tasks, a pair cost that --max-cost can threshold). The
merged weights of the chosen pairs are MTZ's (Eq. 10/11) whichever method chose them.

The method names are options.COSTS; ``method(name)`` gives the registered method.
"""

from __future__ import annotations

from .base import PairMethod, PairProblem, method, methods, register
from . import correlation, hessian, l2, random  # noqa: F401,E402  (each registers its method)

__all__ = ["PairMethod", "PairProblem", "method", "methods", "register"]
