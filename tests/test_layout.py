"""onnxzip layout (onnxzip.layout) and the graph tools deployment engineers run next: onnxsim and onnxslim
keep each task's outputs and every block stored once on the multi layout, onnxsim on the gated one too;
onnxslim's output of the multi layout, gated with onnxzip layout, is the gated model again."""

import hashlib

import numpy as np
import onnx
import onnxsim
import onnxslim
import pytest

import builders as B
from onnxzip.errors import OnnxZipError
from onnxzip.layout import relayout
from onnxzip.merged import inspect
from onnxzip.shapes import graphs

SHAPE = (1, 12, 12)
# Simplifiers fold and reorder float ops: outputs agree to float32 rounding.
TOL = 1e-5
# Initializers of at least this many elements are weight blocks (the rest: shapes, indices, scalars).
BLOCK_MIN_ELEMENTS = 64


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    return tmp, B.cnn_pair_in_both_layouts(tmp, B.calib_folder(tmp / "c", SHAPE, 64))


def _outputs(path, layout: str) -> list[np.ndarray]:
    x = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
    return [B.task_output(path, x, layout, t) for t in range(2)]


def _stored_once(path) -> bool:
    model = onnx.load(str(path))
    blocks = [onnx.numpy_helper.to_array(t) for g in graphs(model.graph) for t in g.initializer
              if np.prod(t.dims) >= BLOCK_MIN_ELEMENTS]
    return len({hashlib.sha256(b.tobytes()).hexdigest() for b in blocks}) == len(blocks) > 0


def _same(got: list[np.ndarray], want: list[np.ndarray], tol: float = 0.0) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def test_each_layout_becomes_the_other_and_back(merged):
    tmp, out = merged
    gated = relayout(out["multi"], "gated", tmp / "to_gated.onnx")
    multi = relayout(gated, "multi", tmp / "back.onnx")
    assert inspect(gated).layout == "gated" and inspect(multi).layout == "multi"
    _same(_outputs(gated, "gated"), _outputs(out["gated"], "gated"))
    _same(_outputs(multi, "multi"), _outputs(out["multi"], "multi"))
    assert _stored_once(gated) and _stored_once(multi)
    same = relayout(out["multi"], "multi", tmp / "same.onnx")
    _same(_outputs(same, "multi"), _outputs(out["multi"], "multi"))


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_onnxsim_keeps_every_task_and_every_block_once(merged, layout, tmp_path):
    _, out = merged
    simplified, ok = onnxsim.simplify(onnx.load(str(out[layout])))
    assert ok
    path = tmp_path / "sim.onnx"
    onnx.save(simplified, str(path))
    _same(_outputs(path, layout), _outputs(out[layout], layout), TOL)
    assert _stored_once(path) and inspect(path).layout == layout


def test_onnxslim_on_the_multi_layout_then_gated_by_onnxzip(merged, tmp_path):
    """The README's way for onnxslim: slim the multi layout (every task kept, blocks once), then gate it."""
    _, out = merged
    slim = tmp_path / "slim.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(out["multi"]))), str(slim))
    _same(_outputs(slim, "multi"), _outputs(out["multi"], "multi"), TOL)
    assert _stored_once(slim)
    gated = relayout(slim, "gated", tmp_path / "slim_gated.onnx")
    _same(_outputs(gated, "gated"), _outputs(out["gated"], "gated"), TOL)
    assert _stored_once(gated)


def test_layout_refuses_an_unknown_layout_and_overwriting_its_input(merged):
    tmp, out = merged
    with pytest.raises(OnnxZipError, match="--to must be one of multi, gated, got 'stacked'"):
        relayout(out["multi"], "stacked", tmp / "x.onnx")
    with pytest.raises(OnnxZipError, match="-o"):
        relayout(out["gated"], "multi", out["gated"])
