"""One-to-one matching of neurons: from a pair-cost matrix (optimal exactly-k, or greedy), or at random."""

from __future__ import annotations

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
