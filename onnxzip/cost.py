"""Cost of sharing neuron pairs and the merged weights of a shared pair (MTZ, He et al. 2018).

Columns of A [d, n_A] and B [d, n_B] are the incoming weights (over the shared inputs, bias last)
of each task's neurons; H_A and H_B are the tasks' damped, alpha-weighted layer-wise Hessians.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve

from .errors import OnnxZipError

COSTS = ("hessian", "l2")


def _factor(H: np.ndarray, where: str):
    try:
        return cho_factor(H, lower=True, check_finite=True)
    except (LinAlgError, ValueError) as exc:
        raise OnnxZipError(f"layer '{where}': the calibration Hessian is not positive definite ({exc}); "
                           "use more calibration samples or a larger damping") from None


def interaction(HA: np.ndarray, HB: np.ndarray, kind: str, where: str) -> np.ndarray:
    """The metric M of the functional difference: Eq. 12, M = (H_A^-1 + H_B^-1)^-1 = H_A (H_A+H_B)^-1 H_B.

    For kind 'l2' M is the identity (plain weight distance).
    """
    if kind == "l2":
        return np.eye(HA.shape[0])
    M = HA @ cho_solve(_factor(HA + HB, where), HB)
    return 0.5 * (M + M.T)


def pair_costs(M: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """All pair costs d(i, j) = 1/2 (a_i - b_j)^T M (a_i - b_j) as [n_A, n_B], by two GEMMs (Eq. 12)."""
    MA, MB = M @ A, M @ B
    D = 0.5 * (np.einsum("di,di->i", A, MA)[:, None] + np.einsum("dj,dj->j", B, MB)[None, :]) - A.T @ MB
    return np.maximum(D, 0.0)


def merged_weights(HA: np.ndarray, HB: np.ndarray, A: np.ndarray, B: np.ndarray, where: str) -> np.ndarray:
    """Merged columns w = (H_A + H_B)^-1 (H_A a + H_B b) for matched columns of A and B (Eq. 10/11)."""
    return cho_solve(_factor(HA + HB, where), HA @ A + HB @ B)
