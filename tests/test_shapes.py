"""Shapes on every edge: merged files (both layouts, a depthwise block) and split files carry a full
type and shape for every tensor a node writes, and the weights are left as they were."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.merged import split
from onnxzip.options import MergeOptions
from onnxzip.shapes import VALUE_BYTES, graphs, infer_edge_shapes


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every value_info's dims over all graphs (an int, or the symbolic name)."""
    return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for g in graphs(model.graph) for vi in g.value_info if vi.type.tensor_type.HasField("shape")}


def _inner_edges(model: onnx.ModelProto) -> set[str]:
    """The tensors nodes write, less each graph's outputs (those carry their own types)."""
    return {o for g in graphs(model.graph) for n in g.node for o in n.output} - {
        o.name for g in graphs(model.graph) for o in g.output}


def _all_dims_known(model: onnx.ModelProto) -> None:
    shapes = _shapes(model)
    assert _inner_edges(model) <= set(shapes), sorted(_inner_edges(model) - set(shapes))[:5]
    assert all(d != 0 for dims in shapes.values() for d in dims), "an unknown dimension"
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp / "b.onnx")
    return tmp, a, b, B.calib_folder(tmp / "calib", (1, 12, 12), n=64)


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_merged_file_has_a_shape_on_every_edge(pair, layout):
    tmp, a, b, calib = pair
    out = tmp / f"m_{layout}.onnx"
    merge([a, b], calib, out, MergeOptions(share=0.5, layout=layout, verify_samples=16))
    model = onnx.load(str(out))
    _all_dims_known(model)
    shapes = _shapes(model)
    assert shapes["conv1.shared.Conv"][0] == "N" and shapes["conv1.shared.Conv"][1] == 3  # batch symbolic, 3 shared
    part = onnx.load(str(split(out, "b", tmp / f"b_{layout}.onnx")))
    _all_dims_known(part)


@pytest.mark.slow
def test_depthwise_blocks_get_shapes_too(tmp_path):
    pytest.importorskip("torch")
    paths = B.mobile_pair(tmp_path / "models")
    out = tmp_path / "m.onnx"
    merge(paths, B.calib_folder(tmp_path / "calib", B.MOBILE_SHAPE, n=64), out,
          MergeOptions(share=0.5, layout="gated", verify_samples=16))
    _all_dims_known(onnx.load(str(out)))


def test_inference_leaves_the_weights_and_skips_their_values():
    big = np.arange(4 * 64 * 3 * 3, dtype=np.float32).reshape(4, 64, 3, 3)
    assert big.nbytes > VALUE_BYTES
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [onnx.helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Reshape", ["c", "shape"], ["y"])]
    inits = [onnx.numpy_helper.from_array(big, "W"), onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], inits),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    before = model.graph.initializer[0].SerializeToString()
    infer_edge_shapes(model)
    assert _shapes(model) == {"c": ["N", 4, 8, 8]}
    assert model.graph.initializer[0].SerializeToString() == before
