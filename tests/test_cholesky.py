"""cholesky.factor: the factor scipy gives, in the matrix's own memory, on one BLAS thread above the limit."""

import numpy as np
import pytest
from scipy.linalg import cho_factor
from threadpoolctl import threadpool_info

from onnxzip import cholesky


def _spd(d: int, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((d, 3 * d))
    return X @ X.T / (3 * d) + 0.1 * np.eye(d)


def _blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


@pytest.mark.parametrize("limit", [0, cholesky.THREADED_FACTOR_MAX_BYTES])
@pytest.mark.parametrize("lower", [True, False])
def test_factor_is_scipys_in_place(monkeypatch, limit, lower):
    monkeypatch.setattr(cholesky, "THREADED_FACTOR_MAX_BYTES", limit)
    H = _spd(300)
    expected = cho_factor(H, lower=lower)[0]
    A = H.copy().T  # Fortran order: factored where it lies
    got, got_lower = cholesky.factor(A, lower=lower)
    assert got_lower is lower and np.shares_memory(got, A)
    part = np.tril if lower else np.triu
    np.testing.assert_allclose(part(got), part(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("above", [True, False])
def test_a_large_factor_runs_on_one_blas_thread(monkeypatch, above):
    seen = []

    def recording(*args, **kwargs):
        seen.append(_blas_threads())
        return cho_factor(*args, **kwargs)

    H = _spd(64).T
    monkeypatch.setattr(cholesky, "cho_factor", recording)
    monkeypatch.setattr(cholesky, "THREADED_FACTOR_MAX_BYTES", H.nbytes - 1 if above else H.nbytes)
    ambient = _blas_threads()
    cholesky.factor(H)
    assert seen == [{1} if above else ambient]
    assert _blas_threads() == ambient  # the limit ends with the factor

