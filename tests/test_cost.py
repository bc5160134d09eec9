"""Pair costs and merged weights (onnxzip.cost): the N-task closed form that folding tasks in one at
a time (zipper._fold) relies on."""

import numpy as np
import pytest

from onnxzip import cost
from onnxzip.cost import PairMetric, matched_costs, pair_costs

# float64 throughout: the identities hold to rounding of well-conditioned solves.
RTOL = 1e-9
# M formed in float32 (cost.METRIC_DTYPE) against float64, on these well-conditioned Hessians.
FLOAT32_RTOL = 1e-5


@pytest.fixture
def float64_metric(monkeypatch):
    """M formed in float64, as the identities below need."""
    monkeypatch.setattr(cost, "METRIC_DTYPE", np.float64)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    X = rng.standard_normal((4 * d, d))
    return X.T @ X / (4 * d) + 0.1 * np.eye(d)


@pytest.mark.parametrize("n_tasks", [2, 3, 5])
def test_folding_tasks_in_gives_the_n_task_closed_form_and_its_cost(n_tasks, float64_metric):
    """w = (sum H_t)^-1 sum H_t w_t, and the step costs add up to 1/2 sum_t (w - w_t)^T H_t (w - w_t)."""
    rng = np.random.default_rng(n_tasks)
    d, units = 7, 4
    H = [_spd(rng, d) for _ in range(n_tasks)]
    W = [rng.standard_normal((d, units)) for _ in range(n_tasks)]
    merged, H_acc, cost = W[0], H[0], np.zeros(units)
    for t in range(1, n_tasks):
        metric = PairMetric(H_acc, H[t], "fc1")
        cost += matched_costs(metric.interaction("hessian"), merged, W[t])
        merged, H_acc = metric.merged_weights(merged, W[t]), H_acc + H[t]
    closed = np.linalg.solve(sum(H), sum(h @ w for h, w in zip(H, W)))
    np.testing.assert_allclose(merged, closed, rtol=RTOL, atol=RTOL)
    direct = sum(0.5 * np.einsum("di,di->i", closed - w, h @ (closed - w)) for h, w in zip(H, W))
    np.testing.assert_allclose(cost, direct, rtol=RTOL, atol=RTOL)


def test_all_pair_costs_match_the_matched_costs_and_vanish_on_equal_columns():
    rng = np.random.default_rng(0)
    d = 6
    metric = PairMetric(_spd(rng, d), _spd(rng, d), "fc1")
    M = metric.interaction("hessian")
    A, B = rng.standard_normal((d, 5)), rng.standard_normal((d, 5))
    B[:, 2] = A[:, 3]
    D = pair_costs(M, A, B)
    np.testing.assert_allclose(np.diag(D), matched_costs(M, A, B), rtol=1e-5, atol=1e-5)
    others = np.delete(D[:, 2], 3)
    assert D[3, 2] < 1e-5 < others.min()
    np.testing.assert_array_equal(metric.merged_weights(A, A), A)


@pytest.mark.parametrize("d,n", [(40, 3), (40, 30)])  # few columns: by products; many: M formed
def test_pair_costs_by_products_equal_those_of_the_formed_metric(d, n, float64_metric):
    """The metric's pair and matched costs, whichever way M X is computed, equal those of M formed (Eq. 12)."""
    rng = np.random.default_rng(3)
    HA, HB = _spd(rng, d), _spd(rng, d)
    metric = PairMetric(HA, HB, "fc")  # M not formed yet: by products where cheaper
    A, B = rng.standard_normal((d, n)), rng.standard_normal((d, n))
    assert metric.by_products(2 * n) == (n == 3)
    M = PairMetric(HA, HB, "fc").interaction("hessian")
    np.testing.assert_allclose(metric.times("hessian", A), M @ A, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(metric.pair_costs("hessian", A, B), pair_costs(M, A, B), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(metric.matched_costs("hessian", A, B), matched_costs(M, A, B), rtol=1e-9)
    np.testing.assert_allclose(metric.pair_costs("l2", A, B), pair_costs(np.eye(d), A, B), rtol=1e-6)
    formed = metric.interaction("hessian")  # formed once, then used for every product
    assert metric.interaction("hessian") is formed
    assert np.array_equal(metric.times("hessian", A), formed @ A)


def test_the_metric_formed_in_float32_equals_the_float64_one(monkeypatch):
    """The default float32 M (cost.METRIC_DTYPE) against float64: the same matrix to float32 rounding, the same
    pairs, and merged weights that do not depend on it (they keep the float64 factor)."""
    rng = np.random.default_rng(5)
    d, n = 50, 12
    HA, HB = _spd(rng, d), _spd(rng, d)
    A = rng.standard_normal((d, n))
    B = A[:, rng.permutation(n)] + 0.05 * rng.standard_normal((d, n))
    assert cost.METRIC_DTYPE == np.float32
    m32 = PairMetric(HA, HB, "fc")
    M32 = m32.interaction("hessian")
    monkeypatch.setattr(cost, "METRIC_DTYPE", np.float64)
    m64 = PairMetric(HA, HB, "fc")
    M64 = m64.interaction("hessian")
    assert M32.dtype == np.float32 and M64.dtype == np.float64
    np.testing.assert_allclose(M32, M64, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * np.abs(M64).max())
    np.testing.assert_array_equal(pair_costs(M32, A, B).argmin(1), pair_costs(M64, A, B).argmin(1))
    np.testing.assert_array_equal(m32.merged_weights(A, B), m64.merged_weights(A, B))


def test_a_float32_sum_that_does_not_factor_falls_back_to_float64():
    """H_A + H_B positive definite in float64 but not after rounding to float32: M is formed in float64."""
    H = np.array([[0.5, 0.5 - 5e-10], [0.5 - 5e-10, 0.5]])  # the off-diagonal rounds to 0.5 in float32
    metric = PairMetric(H, H.copy(), "fc")
    M = metric.interaction("hessian")
    assert M.dtype == np.float64 and np.all(np.isfinite(M))


# Slack over the arrays a step must hold (small vectors, LAPACK's own workspace is not traced).
MEMORY_SLACK = 1.05


def _traced_peak(f) -> tuple[object, int]:
    """f()'s result and the peak of numpy memory allocated while it ran (tracemalloc sees numpy's buffers)."""
    import tracemalloc
    tracemalloc.start()
    try:
        out = f()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_metric_holds_few_d_by_d_arrays_beside_the_hessians():
    """H_A + H_B is factored in its own memory (one float64 d x d array), and M is formed with two float32 d x d
    arrays at a time (M is one of them): VGG-16's fc6 (d = 25,089) needs 5 GB for M, not 15."""
    rng = np.random.default_rng(3)
    d = 600
    HA, HB = _spd(rng, d), _spd(rng, d)
    metric, peak = _traced_peak(lambda: PairMetric(HA, HB, "fc6"))
    assert peak <= MEMORY_SLACK * (8 + 1) * d * d  # the float64 sum, and the finite check's boolean array
    M, peak = _traced_peak(lambda: metric.interaction("hessian"))
    assert M.dtype == np.float32 and np.array_equal(M, M.T)
    assert peak <= MEMORY_SLACK * 2 * 4 * d * d
    np.testing.assert_allclose(M, HA @ np.linalg.solve(HA + HB, HB), rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL)


def test_m_is_formed_only_within_the_memory_headroom(monkeypatch):
    """Forming M needs METRIC_ARRAYS float32 d x d arrays and a byte per entry for the finiteness check, with
    hessian.MEMORY_HEADROOM over it (the budget is measured before the pairing's own allocations)."""
    rng = np.random.default_rng(5)
    d = 300
    metric = PairMetric(_spd(rng, d), _spd(rng, d), "fc")
    need = cost.MEMORY_HEADROOM * (cost.METRIC_ARRAYS * 4 + 1) * d * d
    monkeypatch.setattr(cost, "memory_budget", lambda held=0: need)
    assert not metric.by_products(2 * d)
    monkeypatch.setattr(cost, "memory_budget", lambda held=0: need - 1)
    assert metric.by_products(2 * d)


def test_where_m_would_not_fit_the_products_go_in_column_blocks(monkeypatch):
    """A memory budget below M's arrays takes the products route whatever the flops; its column blocks give
    the costs M gives, holding a few d x block arrays instead of d x d ones."""
    rng = np.random.default_rng(4)
    d, n = 300, 200  # 400 columns: more than PRODUCTS_MAX_COLUMNS_PER_ROW * d, so M would be formed
    HA, HB = _spd(rng, d), _spd(rng, d)
    A, B = rng.standard_normal((d, n)), rng.standard_normal((d, n))
    expected = pair_costs(PairMetric(HA, HB, "fc").interaction("hessian"), A, B)
    monkeypatch.setattr(cost, "memory_budget", lambda held=0: cost.METRIC_ARRAYS * 4 * d * d - 1)
    monkeypatch.setattr(cost, "PRODUCTS_BLOCK_BYTES", 8 * d * 25)  # 25 columns per block
    metric = PairMetric(HA, HB, "fc")
    assert metric.by_products(2 * n)
    costs = metric.pair_costs("hessian", A, B)
    assert metric._M is None
    np.testing.assert_allclose(costs, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    X = np.concatenate([A, B], axis=1)
    _, peak = _traced_peak(lambda: metric.times("hessian", X))
    assert peak <= MEMORY_SLACK * 8 * d * (2 * n + 4 * 25)  # the result and about four blocks, no d x d array
    _, peak = _traced_peak(lambda: metric.pair_costs("hessian", A, B))
    # the costs, their cross terms, a float32 copy of A and a few blocks; [A B] and M [A B] whole would be more
    assert peak <= MEMORY_SLACK * (3 * 8 * n * n + 4 * d * n + 4 * 8 * d * 25) < 2 * 8 * d * 2 * n
    M = PairMetric(HA, HB, "fc").interaction("hessian")
    np.testing.assert_allclose(metric.matched_costs("hessian", A, B), matched_costs(M, A, B), rtol=1e-6)
    w = np.linalg.solve(HA + HB, HA @ A + HB @ B)  # Eq. 10
    np.testing.assert_allclose(metric.merged_weights(A, B), w, rtol=1e-8, atol=1e-10 * np.abs(w).max())
