"""The gated layout's If chain from any multi-layout graph and back (gating.py): the round trip computes
the same function, the range check survives, and the gated file survives ONNX Runtime's offline
optimiser at every level, saved and reloaded."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.format import TASK_INPUT
from onnxzip.gating import gate, ungate
from onnxzip.options import MergeOptions

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
# ORT's fused kernels may reorder float sums: outputs of an optimised file agree to this.
OPTIMISED_ATOL = 1e-5


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gating")
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp / "b.onnx")
    calib = B.calib_folder(tmp / "calib", (1, 12, 12), n=64)
    out = {layout: tmp / f"m_{layout}.onnx" for layout in ("multi", "gated")}
    for layout, path in out.items():
        merge([a, b], calib, path, MergeOptions(share=0.5, layout=layout, verify_samples=16))
    return tmp, out


def _sessions(*paths):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusions: exact comparisons
    return [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]


def _x(n=16):
    return np.random.default_rng(5).random((n, 1, 12, 12), dtype=np.float32)


def _run(sess, layout: str, t: int) -> np.ndarray:
    if layout == "multi":
        return sess.run(None, {"input": _x()})[t]
    return sess.run(None, {"input": _x(), TASK_INPUT: np.array(t, np.int64)})[0]


def test_ungate_then_gate_is_the_same_function(merged, tmp_path):
    _, out = merged
    gated = onnx.load(str(out["gated"]))
    multi = ungate(gated, ["a", "b"])
    again = gate(multi, ["a", "b"])
    for model, name in ((multi, "multi"), (again, "again")):
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    g, m, r = _sessions(out["gated"], tmp_path / "multi.onnx", tmp_path / "again.onnx")
    for t in range(2):
        want = g.run(None, {"input": _x(), TASK_INPUT: np.array(t, np.int64)})[0]
        assert np.array_equal(m.run(None, {"input": _x()})[t], want)
        assert np.array_equal(r.run(None, {"input": _x(), TASK_INPUT: np.array(t, np.int64)})[0], want)
    with pytest.raises(Exception):  # the range check survives the round trip
        r.run(None, {"input": _x(), TASK_INPUT: np.array(2, np.int64)})



@pytest.mark.parametrize("layout", ["multi", "gated"])
@pytest.mark.parametrize("level", LEVELS)
def test_offline_optimised_file_reloads_and_computes_the_same(merged, tmp_path, layout, level):
    _, out = merged
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(out[layout]), so, providers=["CPUExecutionProvider"])
    (original,) = _sessions(out[layout])
    reloaded = ort.InferenceSession(str(tmp_path / "optimised.onnx"), providers=["CPUExecutionProvider"])
    for t in range(2):
        np.testing.assert_allclose(_run(reloaded, layout, t), _run(original, layout, t), atol=OPTIMISED_ATOL)
