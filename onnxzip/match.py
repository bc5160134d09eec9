"""One-to-one matching of neurons: from a pair-cost matrix (optimal exactly-k, or greedy), or at random;
unit by unit, or in groups (the units of a grouped convolution's space: whole groups matched, units
paired within matched groups)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


def _optimal(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nA, nB = D.shape
    if k == min(nA, nB):
        return linear_sum_assignment(D)
    # Exactly k real pairs: dummy rows absorb nB-k columns, dummy columns absorb nA-k rows,
    # and a dummy may never be matched to a dummy.
    P = np.zeros((nA + nB - k, nA + nB - k))
    P[:nA, :nB] = D
    P[nA:, nB:] = np.inf
    rows, cols = linear_sum_assignment(P)
    real = (rows < nA) & (cols < nB)
    return rows[real], cols[real]


def _greedy(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(D, axis=None, kind="stable")
    used_a, used_b = np.zeros(D.shape[0], bool), np.zeros(D.shape[1], bool)
    rows, cols = [], []
    for flat in order:
        if len(rows) == k:
            break
        i, j = divmod(int(flat), D.shape[1])
        if not (used_a[i] or used_b[j]):
            used_a[i] = used_b[j] = True
            rows.append(i)
            cols.append(j)
    return np.array(rows, np.int64), np.array(cols, np.int64)


def match(D: np.ndarray, k: int, solver: str = "optimal", max_cost: float | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Pick k pairs (i, j) of least total cost, one-to-one; drop those with cost >= max_cost.

    Returns row and column indices sorted by row.
    """
    k = int(min(k, *D.shape))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = (_optimal if solver == "optimal" else _greedy)(D, k)
    if max_cost is not None:
        keep = D[rows, cols] < max_cost
        rows, cols = rows[keep], cols[keep]
    order = np.argsort(rows)
    return np.asarray(rows)[order].astype(np.int64), np.asarray(cols)[order].astype(np.int64)


def random_pairs(n_a: int, n_b: int, k: int, seed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """k units of A and k of B drawn uniformly without replacement and paired in random order.

    The paper's random-sharing baseline; ``seed`` seeds a fresh generator, so the same seed gives
    the same pairs. Returns row and column indices sorted by row, like match().
    """
    k = int(min(k, n_a, n_b))
    rng = np.random.default_rng(seed)
    rows, cols = rng.choice(n_a, k, replace=False), rng.choice(n_b, k, replace=False)
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


@dataclass(frozen=True)
class Groups:
    """Both sides' units in contiguous groups of ``size`` units."""

    size: int

    def blocks(self, n: int) -> int:
        """Whole groups among n units."""
        return n // self.size

    def span(self, g: int) -> slice:
        """The units of group g."""
        return slice(g * self.size, (g + 1) * self.size)


def _within(D: np.ndarray, groups: Groups, pairs: list[tuple[int, int]], solver: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """Units paired within each matched group (a perfect matching of its block of D)."""
    rows, cols = [], []
    for ga, gb in pairs:
        r, c = match(D[groups.span(ga), groups.span(gb)], groups.size, solver)
        rows.append(r + ga * groups.size)
        cols.append(c + gb * groups.size)
    return _by_row(rows, cols)


def _by_row(rows: list[np.ndarray], cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of a matching joined, sorted by row."""
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def group_costs(D: np.ndarray, groups: Groups, solver: str = "optimal") -> np.ndarray:
    """Per pair of groups (of A, of B), the total cost of the best pairing of their units."""
    if groups.size == 1:
        return D
    na, nb = groups.blocks(D.shape[0]), groups.blocks(D.shape[1])
    out = np.zeros((na, nb))
    for i in range(na):
        for j in range(nb):
            block = D[groups.span(i), groups.span(j)]
            r, c = match(block, groups.size, solver)
            out[i, j] = block[r, c].sum()
    return out


def match_groups(D: np.ndarray, k: int, groups: Groups, solver: str = "optimal", max_cost: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """k units of least total cost paired in whole groups (k rounded down to whole groups): groups matched
    by their best pairings' costs, units paired within matched groups. A matched group whose mean pair
    cost reaches ``max_cost`` is dropped whole. Returns rows and columns sorted by row."""
    ga, gb = match(group_costs(D, groups, solver), groups.blocks(k), solver)
    rows, cols = _within(D, groups, list(zip(ga.tolist(), gb.tolist())), solver)
    if max_cost is not None and len(rows):
        mean = D[rows, cols].reshape(-1, groups.size).mean(axis=1)
        keep = np.repeat(mean < max_cost, groups.size)
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def random_group_pairs(n_a: int, n_b: int, k: int, groups: Groups, seed: tuple[int, ...]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """random_pairs in whole groups: k // size groups of each side drawn and paired at random, their units
    paired in random order. Rows and columns sorted by row."""
    ga, gb = random_pairs(groups.blocks(n_a), groups.blocks(n_b), groups.blocks(k), seed)
    rows, cols = [], []
    for i, (a, b) in enumerate(zip(ga.tolist(), gb.tolist())):
        r, c = random_pairs(groups.size, groups.size, groups.size, (*seed, i))
        rows.append(r + a * groups.size)
        cols.append(c + b * groups.size)
    return _by_row(rows, cols)
