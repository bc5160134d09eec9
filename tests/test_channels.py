"""Channel ops' numerics (onnxzip/channels.py): per-channel moments against an explicit im2col, pair
costs against Eq. 12 pair by pair, the merged vectors' optimality, and a permuted copy recovered
from the channel costs alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from onnxzip.channels import ChannelMoments, ChannelTerm, matched_costs, merged, pair_costs, vectors, with_vectors
from onnxzip.ir import DEPTHWISE, PRELU, Op

TOL = 1e-9


def _dw(channels: int, k: int = 3, stride: int = 1, pad: int = 1, seed: int = 0) -> Op:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((channels, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    attrs = (("dilations", (1, 1)), ("pads", (pad,) * 4), ("strides", (stride, stride)))
    return Op(DEPTHWISE, attrs, name="dw1", params=(W, b))


def _spd(n: int, d: int, seed: int) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, d, 3 * d))
    return X @ X.transpose(0, 2, 1) / (3 * d) + 0.1 * np.eye(d)


def test_vectors_round_trip():
    op = _dw(5)
    P = vectors(op)
    assert P.shape == (5, 10)
    back = with_vectors(op, P)
    np.testing.assert_array_equal(back.params[0], op.params[0])
    np.testing.assert_array_equal(back.params[1], op.params[1])


# PATCH_CHUNK_BYTES in samples' patch bytes: the whole batch in one chunk; 2 samples per chunk; 2 of the 3
# channels of one sample per chunk (then the last one).
CHUNKS = {"batch": 8.0, "samples": 2.0, "channels": 2 / 3}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (1, 0)])
def test_depthwise_moments_are_each_channels_patch_gram(monkeypatch, stride, pad, chunk):
    import onnxzip.channels as channels
    x = np.random.default_rng(1).standard_normal((5, 3, 6, 7)).astype(np.float32)
    positions = len(range(0, 6 + 2 * pad - 2, stride)) * len(range(0, 7 + 2 * pad - 2, stride))
    monkeypatch.setattr(channels, "PATCH_CHUNK_BYTES", int(chunk * 3 * positions * 9 * 4 + 1))
    op = _dw(3, stride=stride, pad=pad)
    acc = ChannelMoments(op)
    acc.add(x[:1])
    acc.add(x[1:])
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for c in range(3):
        rows = [np.append(xp[n, c, i:i + 3, j:j + 3].reshape(-1), 1.0)
                for n in range(5) for i in range(0, xp.shape[2] - 2, stride) for j in range(0, xp.shape[3] - 2, stride)]
        R = np.array(rows, np.float64)
        assert acc.n == len(R)
        np.testing.assert_allclose(acc.sums[c] / acc.n, R.T @ R / len(R), rtol=1e-6, atol=1e-6)


def test_prelu_moments_are_the_negative_parts_second_moment():
    op = Op(PRELU, (("rank", 4),), name="prelu1", params=(np.full(3, 0.25, np.float32),))
    x = np.random.default_rng(2).standard_normal((4, 3, 5, 5)).astype(np.float32)
    acc = ChannelMoments(op)
    acc.add(x)
    neg = np.minimum(x, 0).astype(np.float64)
    np.testing.assert_allclose(acc.sums[:, 0, 0] / acc.n, (neg ** 2).mean(axis=(0, 2, 3)), rtol=1e-9)


def test_pair_costs_are_eq12_pair_by_pair():
    HA, HB = _spd(4, 5, 0), _spd(6, 5, 1)
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((4, 5)), rng.standard_normal((6, 5))
    D = pair_costs(HA, A, HB, B, "hessian")
    for i in range(4):
        for j in range(6):
            M = HA[i] @ np.linalg.solve(HA[i] + HB[j], HB[j])
            diff = A[i] - B[j]
            assert D[i, j] == pytest.approx(0.5 * diff @ M @ diff, rel=1e-9, abs=TOL)
    np.testing.assert_allclose(pair_costs(HA, A, HB, B, "l2"), 0.5 * ((A[:, None] - B[None]) ** 2).sum(-1))
    rows, cols = np.array([0, 3]), np.array([5, 1])
    np.testing.assert_allclose(matched_costs(HA[rows], A[rows], HB[cols], B[cols], "hessian"), D[rows, cols], rtol=1e-9)
    np.testing.assert_allclose(ChannelTerm(HA, A, HB, B).matched_costs(rows, cols, "hessian"), D[rows, cols], rtol=1e-9)


def test_merged_vectors_minimise_the_summed_quadratic():
    """w = argmin 1/2 (w-a)^T H_A (w-a) + 1/2 (w-b)^T H_B (w-b): the gradient vanishes (to float32)."""
    HA, HB = _spd(3, 4, 4), _spd(3, 4, 5)
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    w = merged(HA, A, HB, B)
    grad = np.einsum("kde,ke->kd", HA, w - A) + np.einsum("kde,ke->kd", HB, w - B)
    assert np.abs(grad).max() < 1e-5
    np.testing.assert_array_equal(merged(HA, A, HB, A), A.astype(np.float32))  # equal vectors stay as they are


def test_a_permuted_copy_is_recovered_from_channel_costs_alone():
    HA = _spd(8, 10, 7)
    A = np.random.default_rng(8).standard_normal((8, 10))
    perm = np.random.default_rng(9).permutation(8)
    rows, cols = linear_sum_assignment(ChannelTerm(HA, A, HA[perm], A[perm]).pair_costs("hessian"))
    np.testing.assert_array_equal(perm[cols], rows)


def test_a_patch_subset_takes_the_full_moments_at_those_positions():
    """With max_patches, the moments are those of the kept positions' patches (hessian.patch_subset)."""
    from onnxzip.hessian import patch_subset
    op = _dw(2, stride=2, pad=1)
    x = np.random.default_rng(3).standard_normal((3, 2, 9, 9)).astype(np.float32)
    sub = ChannelMoments(op, max_patches=7)
    sub.add(x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    r, c = patch_subset(5, 5, 7)
    for ch in range(2):
        R = np.array([np.append(xp[n, ch, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1), 1.0)
                      for n in range(3) for i, j in zip(r, c)])
        np.testing.assert_allclose(sub.sums[ch] / sub.n, R.T @ R / len(R), rtol=1e-6, atol=1e-6)
