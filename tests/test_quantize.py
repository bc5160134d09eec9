"""int8 quantization of merged models through ONNX Runtime: both layouts, static and dynamic; the gated
int8 model computes exactly what the multi int8 one does, every block is stored once, the metadata
stays, and the model agrees with the float one."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.errors import OnnxZipError
from onnxzip.format import KEY_QUANTIZED, TASK_INPUT, meta_key
from onnxzip.merged import inspect
from onnxzip.options import MergeOptions
from onnxzip.quantize import QuantizeOptions, quantize

# Top-1 agreement of the int8 with the float model on the tasks' calibration samples.
MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize")
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp / "b.onnx")
    calib = {"a": B.calib_folder(tmp / "ca", (1, 12, 12), n=96, seed=1),
             "b": B.calib_folder(tmp / "cb", (1, 12, 12), n=96, seed=2)}
    out = {layout: tmp / f"m_{layout}.onnx" for layout in ("multi", "gated")}
    for layout, path in out.items():
        merge([a, b], calib, path, MergeOptions(share=0.5, layout=layout, verify_samples=16))
    return tmp, out, calib


def _sessions(*paths):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusions: exact comparisons
    return [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]


def _x(n=16):
    return np.random.default_rng(5).random((n, 1, 12, 12), dtype=np.float32)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantized_gated_equals_quantized_multi_and_stores_blocks_once(merged, mode):
    tmp, out, calib = merged
    q = {layout: tmp / f"q_{layout}_{mode}.onnx" for layout in out}
    results = {layout: quantize(out[layout], calib, q[layout], QuantizeOptions(mode=mode)) for layout in out}
    gated, multi = _sessions(q["gated"], q["multi"])
    for t in range(2):
        want = multi.run(None, {"input": _x()})[t]
        assert np.array_equal(gated.run(None, {"input": _x(), TASK_INPUT: np.array(t, np.int64)})[0], want)
    for layout, result in results.items():
        model = onnx.load(str(q[layout]))
        weights = [t for t in model.graph.initializer if np.prod(t.dims) >= 64]
        assert len({hashlib.sha256(t.raw_data).hexdigest() for t in weights}) == len(weights)  # once each
        assert not any(node.attribute and any(a.type == onnx.AttributeProto.GRAPH and a.g.initializer
                                              for a in node.attribute) for node in model.graph.node)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta[meta_key(KEY_QUANTIZED)] == f"int8 {mode} (ONNX Runtime)"
        assert inspect(q[layout]).plan.tasks == ("a", "b")  # still a merged model that inspect reads
        assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)  # every weight is int8
        assert [r.task for r in result.tasks] == ["a", "b"]
        assert all(r.agreement >= MIN_AGREEMENT and r.samples == 96 for r in result.tasks), result.tasks


def test_quantize_refuses_bad_options_and_overwriting_its_input(merged):
    tmp, out, calib = merged
    with pytest.raises(OnnxZipError, match="--mode"):
        QuantizeOptions(mode="int4")
    with pytest.raises(OnnxZipError, match="-o"):
        quantize(out["multi"], calib, out["multi"])
