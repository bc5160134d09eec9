"""Matching in groups (onnxzip.match): the units of a grouped convolution's space are matched in whole
groups, units paired only within matched groups."""

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from onnxzip.match import Groups, group_costs, match_groups, random_group_pairs

SIZE, GROUPS = 3, 4


def _grouped_perm(rng: np.random.Generator, order: np.ndarray | None = None) -> np.ndarray:
    order = rng.permutation(GROUPS) if order is None else order
    return np.concatenate([g * SIZE + rng.permutation(SIZE) for g in order])


def _costs(rng: np.random.Generator, perm: np.ndarray) -> np.ndarray:
    """Squared distances between columns and a permuted copy of them: zero exactly on the copy's pairs."""
    A = rng.standard_normal((5, SIZE * GROUPS))
    B = A[:, perm]
    return 0.5 * ((A[:, :, None] - B[:, None, :]) ** 2).sum(axis=0)


def _group_map(rows: np.ndarray, cols: np.ndarray) -> dict[int, int]:
    """The group of A each pair's row lies in -> the group of B of its column; asserts it is one-to-one and
    that every matched group is paired whole."""
    pairs = set(zip((rows // SIZE).tolist(), (cols // SIZE).tolist()))
    mapping = dict(pairs)
    assert len(mapping) == len(pairs) == len(set(mapping.values()))
    assert len(rows) == len(mapping) * SIZE
    return mapping


@pytest.mark.parametrize("solver", ["optimal", "greedy"])
def test_a_copy_permuted_in_whole_groups_is_recovered(solver):
    rng = np.random.default_rng(0)
    perm = _grouped_perm(rng)
    rows, cols = match_groups(_costs(rng, perm), SIZE * GROUPS, Groups(SIZE), solver)
    np.testing.assert_array_equal(perm[cols], rows)
    assert np.all(np.diff(rows) > 0)


def test_a_share_is_rounded_down_to_whole_groups_of_least_cost():
    rng = np.random.default_rng(1)
    D = rng.random((SIZE * GROUPS, SIZE * GROUPS))
    rows, cols = match_groups(D, 2 * SIZE + 2, Groups(SIZE))
    mapping = _group_map(rows, cols)
    assert len(mapping) == 2
    G = group_costs(D, Groups(SIZE))
    best = min(G[a, b] + G[c, e] for (a, c) in itertools.permutations(range(GROUPS), 2)
               for (b, e) in itertools.permutations(range(GROUPS), 2))
    assert D[rows, cols].sum() == pytest.approx(best)
    for ga, gb in mapping.items():  # within a matched pair of groups: the best pairing of its units
        block = D[ga * SIZE:(ga + 1) * SIZE, gb * SIZE:(gb + 1) * SIZE]
        r, c = linear_sum_assignment(block)
        assert D[rows[rows // SIZE == ga], cols[rows // SIZE == ga]].sum() == pytest.approx(block[r, c].sum())


def test_a_threshold_drops_whole_groups():
    rng = np.random.default_rng(2)
    D = rng.random((SIZE * GROUPS, SIZE * GROUPS))
    rows, cols = match_groups(D, SIZE * GROUPS, Groups(SIZE))
    mapping = _group_map(rows, cols)
    means = {g: D[rows[rows // SIZE == g], cols[rows // SIZE == g]].mean() for g in mapping}
    cut = float(np.median(list(means.values())))
    rows, cols = match_groups(D, SIZE * GROUPS, Groups(SIZE), max_cost=cut)
    assert _group_map(rows, cols) == {g: mapping[g] for g, m in means.items() if m < cut} and 0 < len(rows) < SIZE * GROUPS


def test_single_unit_groups_match_unit_by_unit():
    rng = np.random.default_rng(3)
    D = rng.random((6, 5))
    np.testing.assert_array_equal(group_costs(D, Groups(1)), D)
    rows, cols = match_groups(D, 4, Groups(1))
    r, c = linear_sum_assignment(D)
    assert len(rows) == 4 and D[rows, cols].sum() <= D[r, c].sum()


def test_random_pairs_in_groups_are_whole_and_reproducible():
    groups = Groups(SIZE)
    first = random_group_pairs(SIZE * GROUPS, SIZE * GROUPS, 2 * SIZE, groups, (5, 1))
    again = random_group_pairs(SIZE * GROUPS, SIZE * GROUPS, 2 * SIZE, groups, (5, 1))
    other = random_group_pairs(SIZE * GROUPS, SIZE * GROUPS, 2 * SIZE, groups, (6, 1))
    assert len(_group_map(*first)) == 2
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))
