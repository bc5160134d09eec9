"""Cholesky factors of symmetric positive definite matrices in their own memory, at every size.

OpenBLAS's threaded potrf (scipy's and numpy's bundled OpenBLAS 0.3.30/0.3.31) crashes the process
with a segmentation fault on large matrices: a float64 diagonal matrix of order 22,000 (3.9 GB)
factors, one of order 23,100 (4.3 GB) or 25,089 (VGG-16's fc6, 5.0 GB) does not; with one thread
all of them factor (benchmarks/cholesky_threads.py). Large factors therefore run on one BLAS thread:
at order 25,089 that takes about 86 s where two threads would take about 47 s.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor
from threadpoolctl import threadpool_limits

# The largest matrix (bytes) factored with OpenBLAS's threads: below the smallest crash measured (4.3 GB,
# order 23,100 in float64), and at or above every matrix measured to factor (3.9 GB, order 22,000; float32
# at order 25,089, 2.5 GB) less a margin.
THREADED_FACTOR_MAX_BYTES = 3 << 30


def factor(A: np.ndarray, lower: bool = True, check_finite: bool = True) -> tuple[np.ndarray, bool]:
    """scipy's cho_factor of A overwriting A (pass it in Fortran order, e.g. H.T of a symmetric H, or it is
    copied), on one BLAS thread where A is larger than THREADED_FACTOR_MAX_BYTES."""
    if A.nbytes <= THREADED_FACTOR_MAX_BYTES:
        return cho_factor(A, lower=lower, overwrite_a=True, check_finite=check_finite)
    with threadpool_limits(limits=1, user_api="blas"):
        return cho_factor(A, lower=lower, overwrite_a=True, check_finite=check_finite)
