"""The gated layout's If chain from any multi-layout graph and back (gating.py): the round trip computes
the same function, the range check survives, and the gated file survives ONNX Runtime's offline
optimiser at every level, saved and reloaded."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import builders as B
from onnxzip.gating import gate, ungate

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
# ORT's fused kernels may reorder float sums: outputs of an optimised file agree to this.
OPTIMISED_ATOL = 1e-5


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gating")
    return tmp, B.cnn_pair_in_both_layouts(tmp, B.calib_folder(tmp / "calib", (1, 12, 12), n=64))


def _x(n=16):
    return np.random.default_rng(5).random((n, 1, 12, 12), dtype=np.float32)


def test_ungate_then_gate_is_the_same_function(merged, tmp_path):
    _, out = merged
    gated = onnx.load(str(out["gated"]))
    multi = ungate(gated, ["a", "b"])
    again = gate(multi, ["a", "b"])
    for model, name in ((multi, "multi"), (again, "again")):
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    for t in range(2):
        want = B.task_output(out["gated"], _x(), "gated", t, exact=True)
        assert np.array_equal(B.task_output(tmp_path / "multi.onnx", _x(), "multi", t, exact=True), want)
        assert np.array_equal(B.task_output(tmp_path / "again.onnx", _x(), "gated", t, exact=True), want)
    with pytest.raises(Exception):  # the range check survives the round trip
        B.task_output(tmp_path / "again.onnx", _x(), "gated", 2)


@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("level", LEVELS)
def test_offline_optimised_file_reloads_and_computes_the_same(merged, tmp_path, layout, level):
    _, out = merged
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(out[layout]), so, providers=["CPUExecutionProvider"])
    for t in range(2):
        np.testing.assert_allclose(B.task_output(tmp_path / "optimised.onnx", _x(), layout, t),
                                   B.task_output(out[layout], _x(), layout, t, exact=True), atol=OPTIMISED_ATOL)
