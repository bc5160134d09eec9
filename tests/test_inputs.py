"""One merged input for every task (onnxzip/inputs.py): models that read the same data in another rank
or layout merge through weight-free adapters; models that read different data are refused naming both."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.format import KEY_SOURCES, meta_key
from onnxzip.inputs import adapted, check_inputs, expected, feeder, same_data
from onnxzip.merged import input_line, inspect, split
from onnxzip.options import MergeOptions

TOL = 1e-4
WIDTHS = [64, 16, 12, 5]
IMAGE = (1, 8, 8)
SAMPLES = 96
# Each form of one 8x8 one-channel image, with the calibration shape its file reads.
FORMS = {"image": ((1, 8, 8), B.ExportForm()), "flat": ((64,), B.ExportForm()),
         "rank3": ((8, 8), B.ExportForm()), "nhwc": ((8, 8, 1), B.ExportForm(nhwc=True))}


def _mlp(layers, form: str) -> onnx.ModelProto:
    shape, export = FORMS[form]
    return B.exporter_model(layers, IMAGE if form == "nhwc" else shape, export)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE)).astype(np.float32)


def _as(form: str, x: np.ndarray) -> np.ndarray:
    """Images [n, 1, 8, 8] in the shape a form's file reads."""
    return x.transpose(0, 2, 3, 1) if form == "nhwc" else x.reshape(len(x), *FORMS[form][0])


@pytest.mark.parametrize("form_a, form_b", [("image", "flat"), ("flat", "image"), ("rank3", "nhwc"),
                                            ("nhwc", "flat")])
def test_one_image_in_two_forms_merges_and_recovers_a_permuted_copy(tmp_path, form_a, form_b):
    layers = B.mlp_weights(WIDTHS, 0)
    a = B.save(_mlp(layers, form_a), tmp_path / "a.onnx")
    b = B.save(_mlp(B.permute_hidden(layers, 1)[0], form_b), tmp_path / "b.onnx")
    x = _images(SAMPLES, 2)
    calib = {"a": B.calib_from_array(tmp_path / "ca", _as(form_a, x)),
             "b": B.calib_from_array(tmp_path / "cb", _as(form_b, x))}
    out = tmp_path / "m.onnx"
    result = merge([a, b], calib, out, MergeOptions(tasks=("a", "b")))
    assert [lp.n_shared for lp in result.plan.layers] == [16, 12, 0]  # the permutation found exactly
    assert all(c.max_diff_vs_tied <= TOL and c.top1_agreement == 1.0 for c in result.checks)
    ya, yb = B.run(out, _as(form_a, x[:8]))
    want = B.run(a, _as(form_a, x[:8]))[0]
    np.testing.assert_allclose(ya, want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yb, want, rtol=TOL, atol=TOL)  # task b on a's input form, its own function
    model = onnx.load(str(out))
    first = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Gemm")
    assert first <= 2 and sum(n.input[0] == model.graph.node[first].input[0] for n in model.graph.node) == 1
    sources = json.loads({p.key: p.value for p in model.metadata_props}[meta_key(KEY_SOURCES)])
    assert sources["b"]["input"]["shape"][1:] == list(_as(form_b, x[:1]).shape[1:])
    assert "own folders" in result.inputs[-1] and len(result.inputs) == 3


def test_the_feeder_gives_each_task_its_first_layer_input(tmp_path):
    layers = B.mlp_weights(WIDTHS, 0)
    nets = [import_network(B.save(_mlp(layers, f), tmp_path / f"{f}.onnx")) for f in FORMS]
    x = _images(4, 3)
    for net, form in zip(nets, FORMS):
        fed = feeder(nets[0], net)(_as(form, x))
        np.testing.assert_array_equal(fed, _as("image", x))  # back in the merged (first) model's form
    words = [e.from_merged for e in expected(nets)]
    assert words == ["Flatten to [N, features]"] * 4  # every task: one Flatten of the merged input
    assert len({a.steps[0] for a in adapted(nets)}) == 1  # the same step, emitted once


def test_three_channel_image_and_nhwc_copy_agree_but_a_flat_vector_is_refused(tmp_path):
    layers = B.cnn_weights(0, in_ch=3)
    nchw = import_network(B.save(B.cnn_model(layers), tmp_path / "nchw.onnx"))
    nhwc = import_network(B.save(B.exporter_model(layers, (3, 12, 12), B.ExportForm(nhwc=True)), tmp_path / "nhwc.onnx"))
    check_inputs([nchw, nhwc])
    flat = import_network(B.save(B.mlp_model(B.mlp_weights([432, 8, 3], 0), in_shape=(432,)), tmp_path / "flat.onnx"))
    with pytest.raises(OnnxZipError, match=r"flat\.onnx: reads input 'input' \[N, 432\].*nchw\.onnx reads "
                                           r"\[N, 3, 12, 12\].*same data \(a flat vector's channel order is unknown"):
        check_inputs([nchw, flat])


@pytest.mark.parametrize("a, b, same", [((1, 28, 28), (784,), True), ((28, 28), (1, 28, 28), True),
                                        ((1, 1, 784), (784,), True), ((3, 32, 32), (3072,), False),
                                        ((1, 28, 28), (1, 32, 32), False), ((3, 8, 8), (3, 8, 8), True),
                                        ((2, 8, 8), (8, 8, 2), False)])
def test_same_data(a, b, same):
    assert same_data(a, b) is same and same_data(b, a) is same


def test_inspect_shows_what_each_task_reads(tmp_path):
    layers = B.mlp_weights(WIDTHS, 0)
    a = B.save(_mlp(layers, "image"), tmp_path / "a.onnx")
    b = B.save(_mlp(B.permute_hidden(layers, 1)[0], "flat"), tmp_path / "b.onnx")
    x = _images(SAMPLES, 2)
    out = tmp_path / "m.onnx"
    result = merge([a, b], {"a": B.calib_from_array(tmp_path / "ca", x),
                            "b": B.calib_from_array(tmp_path / "cb", _as("flat", x))}, out,
                   MergeOptions(tasks=("a", "b"), input_scale=(("b", 2.0, -1.0),)))
    assert result.inputs[1].endswith("scaled as its --input-scale says") and len(result.inputs) == 2
    info = inspect(out)
    assert input_line(info.sources["b"]) == ("its file reads 'input' [N, 64] (flat); from the merged input: "
                                             "Flatten to [N, features]; it expects 2 * u - 1 of the merged input u")


@pytest.mark.parametrize("form_a, form_b", [("image", "flat"), ("nhwc", "rank3")])
def test_a_split_task_reads_the_input_its_file_read(tmp_path, form_a, form_b):
    layers = B.mlp_weights(WIDTHS, 0)
    a = B.save(_mlp(layers, form_a), tmp_path / "a.onnx")
    b = B.save(_mlp(B.mlp_weights(WIDTHS, 3), form_b), tmp_path / "b.onnx")
    x = _images(SAMPLES, 2)
    out = tmp_path / "m.onnx"
    merge([a, b], {"a": B.calib_from_array(tmp_path / "ca", _as(form_a, x)),
                   "b": B.calib_from_array(tmp_path / "cb", _as(form_b, x))}, out,
          MergeOptions(tasks=("a", "b"), share=0.5))
    for task, form in (("a", form_a), ("b", form_b)):
        part = split(out, task, tmp_path / f"{task}.onnx")
        model = onnx.load(str(part))
        assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == list(FORMS[form][0])
        merged_t = B.run(out, _as(form_a, x[:8]))["ab".index(task)]
        np.testing.assert_allclose(B.run(part, _as(form, x[:8]))[0], merged_t, rtol=TOL, atol=TOL)


def test_nothing_is_said_of_one_input_form_from_one_folder(tmp_path):
    a = B.save(_mlp(B.mlp_weights(WIDTHS, 0), "image"), tmp_path / "a.onnx")
    b = B.save(_mlp(B.mlp_weights(WIDTHS, 1), "image"), tmp_path / "b.onnx")
    calib = B.calib_from_array(tmp_path / "c", _images(SAMPLES, 2))
    assert merge([a, b], calib, tmp_path / "m.onnx").inputs == ()
    both = merge([a, b], {"a": calib, "b": B.calib_from_array(tmp_path / "c2", _images(SAMPLES, 3))},
                 tmp_path / "m2.onnx", MergeOptions(tasks=("a", "b")))
    assert len(both.inputs) == 3 and "no --input-scale was given" in both.inputs[-1]
