"""The label-free correction at scale: the dual (rows) form, in-place primal solves, the memory limit
and progress, down to a CNN whose head reads thousands of features from a few calibration samples."""

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from scipy.linalg import cho_factor, cho_solve

import builders as B
from onnxzip import correct, hessian, zipper
from onnxzip.api import merge
from onnxzip.correct import dual_solve, refit_update, relative_error
from onnxzip.hessian import GRAM, MEMORY_LIMIT_ENV, ROWS, SKIPPED, MomentAccumulator, damping_from_diag
from onnxzip.options import MergeOptions
from onnxzip.plan import LayerPlan, SharingPlan

# float64 kernels against a float64 reference; the primal's Gram is accumulated from float32 products.
EXACT = 1e-6
# Wide-head CNN: input size, channels of the two convs (head inputs = C2 * SIZE^2), samples.
SIZE, C1, C2, CLASSES, SAMPLES = 20, 6, 12, 10, 96
HEAD_D = C2 * SIZE * SIZE + 1


def _problem(n: int, d: int, m: int, seed: int = 0):
    """Rows X [n, d], residuals R = Z - [X|1] W0^T and targets Z, in float32, and W0 (dense)."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * rng.random(d)).astype(np.float32)
    W0 = 0.01 * rng.standard_normal((m, d + 1))
    Z = (X @ rng.standard_normal((d, m)) / np.sqrt(d) + rng.standard_normal((n, m))).astype(np.float32)
    R = (Z - np.hstack([X, np.ones((n, 1), np.float32)]) @ W0.T.astype(np.float32)).astype(np.float32)
    return X, R, Z, W0


def _accumulate(X, R, Z, rows, batch: int = 37) -> MomentAccumulator:
    acc = MomentAccumulator(X.shape[1], R.shape[1], rows=rows)
    for s in range(0, X.shape[0], batch):
        acc.add(X[s:s + batch], R[s:s + batch], Z[s:s + batch])
    return acc


def _reference(X, R, rel: float) -> np.ndarray:
    """The primal ridge update E[r x^T] (E[x x^T] + lambda I)^-1 in float64, lambda = rel * mean diag."""
    Xb = np.hstack([X, np.ones((X.shape[0], 1))]).astype(np.float64)
    G, C = Xb.T @ Xb / len(X), R.astype(np.float64).T @ Xb / len(X)
    lam = rel * np.mean(np.diag(G))
    return np.linalg.solve(G + lam * np.eye(len(G)), C.T).T


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("n,d", [(60, 500), (700, 120)])
def test_dual_form_equals_primal_with_fewer_and_more_rows_than_inputs(n, d):
    X, R, Z, W0 = _problem(n, d, 4)
    rows, gram = _accumulate(X, R, Z, rows=True), _accumulate(X, R, Z, rows=False)
    assert rows.form == ROWS and gram.form == GRAM
    # the damping is one definition in both forms: rel * mean(diag Gram)
    assert damping_from_diag(rows.diag, 1e-3) == pytest.approx(damping_from_diag(gram.diag, 1e-3), rel=EXACT)
    for rel in (1e-3, 1e-1):
        ref = _reference(X, R, rel)
        assert _rel(refit_update(W0, rows, rel), ref) < EXACT
        if n > d:  # the float32-product Gram is exact enough only where it is not rank-deficient
            assert _rel(refit_update(W0, gram, rel), ref) < EXACT
    dW = refit_update(W0, rows, 1e-3)
    Xb = np.hstack([X, np.ones((n, 1))])
    direct = np.sqrt(((R - Xb @ dW.T) ** 2).sum() / (Z.astype(np.float64) ** 2).sum())
    assert relative_error(dW, rows) == pytest.approx(direct, rel=1e-5)
    if n > d:
        assert relative_error(dW, gram) == pytest.approx(direct, rel=1e-4)


def test_dual_solve_is_the_push_through_identity():
    rng = np.random.default_rng(1)
    X, R = rng.standard_normal((30, 80)).astype(np.float32), rng.standard_normal((30, 3))
    X64, lam = X.astype(np.float64), 0.05
    primal = (R.T @ X64 / 30) @ np.linalg.inv(X64.T @ X64 / 30 + lam * np.eye(80))
    np.testing.assert_allclose(dual_solve([X[:13], X[13:]], R, lam), primal, rtol=1e-9, atol=1e-12)


def test_primal_solve_leaves_the_gram_as_it_was_and_matches_a_copying_solve(monkeypatch):
    X, R, Z, W0 = _problem(400, 90, 5, seed=2)
    acc = _accumulate(X, R, Z, rows=False)
    G = acc.gram.copy()
    assert np.array_equal(G, G.T)  # syrk chunk products: the in-place factorisation relies on it
    error = relative_error(W0 * 0.5, acc)
    dW = refit_update(W0, acc, 1e-3)
    assert np.array_equal(acc.gram, G)
    monkeypatch.setattr(correct, "CHUNK_BYTES", 8 * 91 * 7)  # the restore and the error in many blocks
    assert np.array_equal(refit_update(W0, acc, 1e-3), dW) and np.array_equal(acc.gram, G)
    assert relative_error(W0 * 0.5, acc) == pytest.approx(error, rel=1e-6)
    lam = damping_from_diag(np.diag(G), 1e-3)
    expected = cho_solve(cho_factor(G + lam * np.eye(len(G)), lower=True), acc.cross.T).T
    np.testing.assert_array_equal(dW, expected)
    sparse = W0 * (np.random.default_rng(3).random(W0.shape) < 0.3)
    sparse[:, -1] = 0.1
    dS = refit_update(sparse, acc, 1e-3)
    assert np.array_equal(acc.gram, G) and np.all(dS[:, :-1][sparse[:, :-1] == 0] == 0)


def test_pruned_rows_form_matches_the_primal_on_each_support():
    X, R, Z, W0 = _problem(300, 40, 3, seed=4)
    W0 = W0 * (np.random.default_rng(5).random(W0.shape) < 0.5)
    W0[:, -1] = 0.2
    gram, rows = _accumulate(X, R, Z, rows=False), _accumulate(X, R, Z, rows=True)
    np.testing.assert_allclose(refit_update(W0, rows, 1e-2), refit_update(W0, gram, 1e-2), rtol=1e-5, atol=1e-7)


def test_wide_rows_fold_into_the_gram_exactly_once_it_is_the_smaller_form(monkeypatch):
    monkeypatch.setattr(hessian, "ROWS_MIN_FEATURES", 16)
    X, R, Z, _ = _problem(600, 40, 2, seed=6)
    auto = MomentAccumulator(40, 2)
    fixed = _accumulate(X, R, Z, rows=False)
    auto.add(X[:20], R[:20], Z[:20])
    f = np.array([0, 3, 7, 40])
    assert auto.form == ROWS and auto.held_bytes < 40 * 40 * 8
    partial = MomentAccumulator(40, 2, rows=False)
    partial.add(X[:20], R[:20], Z[:20])
    np.testing.assert_allclose(auto.gram_block(f), partial.gram_block(f), rtol=1e-6)
    for s in range(20, 600, 37):
        auto.add(X[s:s + 37], R[s:s + 37], Z[s:s + 37])
    assert auto.form == GRAM
    # not the same chunks as ``fixed`` (batches differ), but the same moments to float32 products
    np.testing.assert_allclose(auto.gram, fixed.gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(auto.cross, fixed.cross, rtol=1e-5, atol=1e-6)


def test_moments_that_do_not_fit_are_not_allocated(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(100_000))
    X, R, Z, W0 = _problem(50, 300, 2, seed=7)  # Gram: 301^2 * 8 bytes
    acc = _accumulate(X, R, Z, rows=False)
    assert acc.form == SKIPPED and acc.held_bytes == 0 and not acc.has_moments
    assert acc.note == "needs 1.1 MiB, 97.7 KiB available"
    assert relative_error(np.zeros_like(W0), acc) == pytest.approx(np.sqrt(acc.rr / acc.zz))
    with pytest.raises(ValueError, match="needs 1.1 MiB"):
        refit_update(W0, acc, 1e-3)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(10_000))
    assert _accumulate(X, R, Z, rows=True).form == SKIPPED  # the rows themselves: 50 * 304 * 4 bytes


def test_plan_json_with_and_without_a_note():
    plan = SharingPlan(("a", "b"), (LayerPlan("fc1", "fc", (3, 3), (), 0.0, (0.1, 0.2), False, "correction skipped"),
                                    LayerPlan("fc2", "fc", (2, 2))))
    assert SharingPlan.from_json(plan.to_json()) == plan
    assert '"note"' not in SharingPlan(plan.tasks, plan.layers[1:]).to_json()  # old readers see old JSON


def _wide_cnn(seed: int) -> onnx.ModelProto:
    """conv-relu-conv-relu-flatten-fc: a head over C2 * SIZE^2 features."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    w = {"W1": he(C1, 1, 3, 3), "b1": np.full(C1, 0.1, np.float32), "W2": he(C2, C1, 3, 3),
         "b2": np.full(C2, 0.05, np.float32), "W3": he(CLASSES, HEAD_D - 1), "b3": np.zeros(CLASSES, np.float32)}
    nodes = [helper.make_node("Conv", ["input", "W1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W3", "b3"], ["logits"], name="fc", transB=1)]
    return B.graph_model(nodes, w, (1, SIZE, SIZE), (CLASSES,))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two wide-head CNNs and their calibration folder (fewer samples than head inputs)."""
    tmp = tmp_path_factory.mktemp("wide")
    paths = [B.save(_wide_cnn(s), tmp / f"{name}.onnx") for s, name in enumerate("ab")]
    return tmp, paths, B.calib_folder(tmp / "calib", (1, SIZE, SIZE), n=SAMPLES)


def _head(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.name.startswith("fc1.")}


class _Stages:
    """A progress function that records each stage's label, total and ticks."""

    def __init__(self):
        self.seen: dict[str, list[int]] = {}
        self.units: dict[str, str] = {}

    def __call__(self, label: str, total: int, unit: str):
        self.seen[label], self.units[label] = [total, 0], unit
        return lambda: self.seen[label].__setitem__(1, self.seen[label][1] + 1)


def test_wide_head_is_corrected_in_its_dual_form_without_a_d_by_d_matrix(wide, monkeypatch):
    tmp, paths, calib = wide
    monkeypatch.setattr(zipper, "PROGRESS_MIN_FLOPS", 0)  # every correction and pairing gets its stage
    stages = _Stages()
    tracemalloc.start()
    try:
        result = merge(paths, calib, tmp / "dual.onnx", MergeOptions(share=0.5), progress=stages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HEAD_D * HEAD_D * 8 / 2  # the old path held several d x d float64 matrices
    head = result.plan.layers[-1]
    assert head.name == "fc1" and head.corrected and not head.note and max(head.rel_error) < 1e-3
    assert stages.seen["correct layer fc1 (a)"] == [1, 1] and stages.seen["pair layer conv2"] == [2, 2]
    assert not any(label.startswith("pair layer fc1") for label in stages.seen)
    assert stages.units["layer conv1"] == "batches" and stages.units["verify"] == "tasks"  # every bar says what it counts
    assert all(stages.units.values())
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks)

    monkeypatch.setattr(hessian, "ROWS_MIN_FEATURES", HEAD_D)  # the same merge through the primal form
    primal = merge(paths, calib, tmp / "primal.onnx", MergeOptions(share=0.5))
    assert [l.shared for l in primal.plan.layers] == [l.shared for l in result.plan.layers]
    # Same function on the calibration samples. (The weights agree less closely: with n < d the
    # primal's Gram, summed from float32 products, is rank-deficient, so its solution is exact only
    # up to float noise in the directions the samples do not span; the dual form has none there.)
    x = np.random.default_rng(0).random((SAMPLES, 1, SIZE, SIZE), dtype=np.float32)  # calib_folder's samples
    for t in range(2):
        dual_out, primal_out = (B.task_output(tmp / f"{form}.onnx", x, "multi", t) for form in ("dual", "primal"))
        np.testing.assert_allclose(dual_out, primal_out, atol=1e-4 * np.abs(primal_out).max())


def test_correction_that_does_not_fit_is_skipped_and_reported(wide, monkeypatch, capsys):
    tmp, paths, calib = wide
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(1 << 20))  # the convs' moments fit, the head's rows do not
    result = merge(paths, calib, tmp / "skipped.onnx", MergeOptions(share=0.5))
    head = result.plan.layers[-1]
    assert not head.corrected and result.layers[-1].note == head.note
    assert head.note.startswith("correction skipped for a, b: needs ") and head.note.endswith(" 1.0 MiB available")
    assert all(lp.corrected and not lp.note for lp in result.plan.layers[1:-1])
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks)  # emitted == tied
    for t, path in enumerate(paths):  # the head keeps its tied (here: original) weights
        original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        merged = _head(tmp / "skipped.onnx")
        task = "ab"[t]
        np.testing.assert_array_equal(merged[f"fc1.task_{task}.B"], original["b3"])
        blocks = np.concatenate([merged[f"fc1.task_{task}.W_from_shared"], merged[f"fc1.task_{task}.W"]], axis=1)
        np.testing.assert_array_equal(np.sort(blocks, axis=None), np.sort(original["W3"], axis=None))
    from onnxzip.cli.main import _print_result
    _print_result(result)
    table = capsys.readouterr().out
    assert "note" in table and "correction skipped" in table


def test_a_paired_layer_whose_moments_do_not_fit_is_refused_by_name(wide, monkeypatch):
    from onnxzip.errors import OnnxZipError
    tmp, paths, calib = wide
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(10_000))  # conv1's Gram fits, conv2's (55 x 55) does not
    with pytest.raises(OnnxZipError, match="layer 'conv2': pairing its units needs the Hessian"):
        merge(paths, calib, tmp / "refused.onnx", MergeOptions(share=0.5))
    assert not (tmp / "refused.onnx").exists()
