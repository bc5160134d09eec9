"""The pair-choice method interface, the problem a method solves, and the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from ..channels import ChannelTerm
from ..cost import PairMetric
from ..match import Groups, match, match_groups
from ..options import COSTS

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows of A, columns of B, each pair's cost


@dataclass(frozen=True)
class PairProblem:
    """The pairs to choose for one unit space: per writer layer its metric and the columns of the
    two sides (A: the first task or the units merged so far, B: the task added); how many pairs;
    how to match; the seed of a random draw; and, for methods that compare pre-activations, a
    function computing their cost matrix from the calibration data."""

    metrics: Sequence[PairMetric]
    A: Sequence[np.ndarray]
    B: Sequence[np.ndarray]
    count: int
    solver: str
    max_cost: float | None
    seed: tuple[int, ...]
    activation_costs: Callable[[], np.ndarray] | None = None
    # The space's channel ops (depthwise convs, PRelus): their pair costs add to the writers'.
    channels: Sequence[ChannelTerm] = ()
    # The space's groups when a grouped conv reads or writes it (spaces.py): pairs in whole matched groups.
    groups: Groups | None = None

    def summed_costs(self, kind: str) -> np.ndarray:
        """All pair costs under metric ``kind``, summed over the writers (Eq. 12 by GEMMs) and the channel ops."""
        return sum([m.pair_costs(kind, a, b) for m, a, b in zip(self.metrics, self.A, self.B)]
                   + [c.pair_costs(kind) for c in self.channels])

    def matched(self, D: np.ndarray) -> Pairs:
        """The matching of cost matrix D (--solver, --max-cost; in whole groups where the space has them)
        with each pair's cost."""
        if self.groups is None:
            rows, cols = match(D, self.count, self.solver, self.max_cost)
        else:
            rows, cols = match_groups(D, self.count, self.groups, self.solver, self.max_cost)
        return rows, cols, D[rows, cols]

    def costs_of(self, rows: np.ndarray, cols: np.ndarray, kind: str) -> np.ndarray:
        """The costs under metric ``kind`` of pairs chosen otherwise, summed over the writers."""
        return sum([m.matched_costs(kind, a[:, rows], b[:, cols])
                    for m, a, b in zip(self.metrics, self.A, self.B)]
                   + [c.matched_costs(rows, cols, kind) for c in self.channels])


class PairMethod(ABC):
    """How one pair-choice method chooses pairs, and what it needs."""

    name: ClassVar[str]
    # The metric of the costs reported for the shared units when the space is tied.
    tie_metric: ClassVar[str] = "hessian"
    # Requirements, checked before any work (api): one calibration source for every task, at most this
    # many tasks (None: any), and a cost that --max-cost can threshold.
    same_calibration: ClassVar[bool] = False
    max_tasks: ClassVar[int | None] = None
    thresholdable: ClassVar[bool] = True

    @abstractmethod
    def choose(self, problem: PairProblem) -> Pairs:
        """The pairs of ``problem``: rows of A, columns of B (sorted by row) and each pair's cost."""


_REGISTRY: dict[str, PairMethod] = {}


def register(cls: type[PairMethod]) -> type[PairMethod]:
    """Class decorator: make ``cls`` the method of its name."""
    if cls.name in _REGISTRY:
        raise ValueError(f"internal error: pair-choice method '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def method(name: str) -> PairMethod:
    """The registered method ``name`` (options.COSTS lists the names)."""
    return _REGISTRY[name]


def methods() -> dict[str, PairMethod]:
    """Every registered method by name, in the order options.COSTS lists them."""
    return {name: _REGISTRY[name] for name in COSTS if name in _REGISTRY}
