"""Errors a user can cause: one line on stderr naming the culprit, exit code 2, no output file."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.errors import OnnxZipError
from onnxzip.options import MergeOptions

SHAPE = (1, 8, 8)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxzip.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def _good_pair(tmp_path):
    a = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 1)), tmp_path / "b.onnx")
    return a, b


def _assert_user_error(proc, out, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def _calib_with(tmp_path, x):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "bad.npz", input=x)
    return folder


def test_corrupt_model_file(tmp_path):
    a, _ = _good_pair(tmp_path)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    calib = B.calib_folder(tmp_path / "c", SHAPE, 32)
    out = tmp_path / "m.onnx"
    _assert_user_error(_cli("merge", a, bad, "--calib", calib, "-o", out), out, "broken.onnx")


def test_unsupported_op(tmp_path):
    a, _ = _good_pair(tmp_path)
    model = B.mlp_model(B.mlp_weights([64, 16, 10], 1))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.name = "Sin", "strange_act"
    b = B.save(model, tmp_path / "b.onnx")
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", B.calib_folder(tmp_path / "c", SHAPE, 32), "-o", out)
    _assert_user_error(proc, out, "b.onnx", "strange_act", "Sin")


def test_first_layers_of_different_kinds(tmp_path):
    a, _ = _good_pair(tmp_path)
    b = B.save(B.cnn_model(B.cnn_weights(1, size=8), size=8), tmp_path / "cnn.onnx")
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", B.calib_folder(tmp_path / "c", SHAPE, 32), "-o", out)
    _assert_user_error(proc, out, "cnn.onnx", "'conv1'", "is conv", "the first layers must align")


@pytest.mark.parametrize("case,x,needle", [
    ("shape", np.zeros((4, 1, 7, 7), np.float32), "shape"),
    ("dtype", np.zeros((4, 1, 8, 8), np.float64), "float64"),
    ("nan", np.where(np.arange(256).reshape(4, 1, 8, 8) == 70, np.nan, 0.5).astype(np.float32), "NaN"),
])
def test_bad_calibration_arrays(tmp_path, case, x, needle):
    a, b = _good_pair(tmp_path)
    out = tmp_path / "m.onnx"
    _assert_user_error(_cli("merge", a, b, "--calib", _calib_with(tmp_path, x), "-o", out), out, "bad.npz", needle)


def test_empty_calibration_folder(tmp_path):
    a, b = _good_pair(tmp_path)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "m.onnx"
    _assert_user_error(_cli("merge", a, b, "--calib", tmp_path / "empty", "-o", out), out, "empty")


def test_external_data_outside_the_model_folder(tmp_path):
    a, _ = _good_pair(tmp_path)
    inner = tmp_path / "models"
    inner.mkdir()
    model = B.mlp_model(B.mlp_weights([64, 16, 10], 1))
    onnx.save(model, str(inner / "b.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="b.data", size_threshold=0)
    (inner / "b.data").rename(tmp_path / "stolen.data")
    model = onnx.load(str(inner / "b.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../stolen.data"
    onnx.save(model, str(inner / "b.onnx"))
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, inner / "b.onnx", "--calib", B.calib_folder(tmp_path / "c", SHAPE, 32), "-o", out)
    _assert_user_error(proc, out, "b.onnx", "outside the model's folder")


def test_external_data_inside_the_folder_loads(tmp_path):
    a, _ = _good_pair(tmp_path)
    model = B.mlp_model(B.mlp_weights([64, 16, 10], 1))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, tmp_path / "ext.onnx", "--calib", B.calib_folder(tmp_path / "c", SHAPE, 32), "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_bad_options_and_usage(tmp_path):
    a, b = _good_pair(tmp_path)
    calib = B.calib_folder(tmp_path / "c", SHAPE, 32)
    out = tmp_path / "m.onnx"
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", out, "--share", "1.5"), out, "--share")
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", out, "--share-layer", "fc9=0.5"), out, "fc9")
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", out, "--share-layer", "fc2=0.5"), out, "head")
    _assert_user_error(_cli("merge", a, b, "--calib", "x=" + str(calib), "-o", out), out, "unknown task")
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", out, "--stream-pairing", "late"), out,
                       "--stream-pairing", "'late' is not one of 'all', 'early'")  # checked on parsing
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", a), a.parent / "none.onnx", "overwrite")
    assert a.exists()
    proc = _cli("merge", a, b, "--calib", calib, "--no-such-flag", "-o", out)
    assert proc.returncode == 2 and not out.exists()


def test_bad_eval_folder_is_refused_before_merging(tmp_path):
    a, b = _good_pair(tmp_path)
    calib = B.calib_folder(tmp_path / "c", SHAPE, 32)
    no_labels = B.calib_folder(tmp_path / "ev", SHAPE, 16)
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", calib, "--eval", f"a={no_labels}", "-o", out)
    _assert_user_error(proc, out, "part0.npz", "labels")


def test_correlation_needs_one_calibration_folder(tmp_path):
    a, b = _good_pair(tmp_path)
    ca, cb = B.calib_folder(tmp_path / "ca", SHAPE, 32, seed=1), B.calib_folder(tmp_path / "cb", SHAPE, 32, seed=2)
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxZipError, match="--cost correlation"):
        merge([a, b], {"a": ca, "b": cb}, out, MergeOptions(cost="correlation"))
    assert not out.exists()
    proc = _cli("merge", a, b, "--calib", f"a={ca}", "--calib", f"b={cb}", "--cost", "correlation", "-o", out)
    _assert_user_error(proc, out, "--cost correlation", "--calib")
    # one folder, named twice in different spellings, is the same data
    merge([a, b], {"a": ca, "b": tmp_path / "cb" / ".." / "ca"}, out, MergeOptions(cost="correlation"))
    assert out.exists()


def test_random_cost_options(tmp_path):
    a, b = _good_pair(tmp_path)
    calib = B.calib_folder(tmp_path / "c", SHAPE, 32)
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", calib, "-o", out, "--cost", "random", "--max-cost", "0.1")
    _assert_user_error(proc, out, "--max-cost", "random")
    _assert_user_error(_cli("merge", a, b, "--calib", calib, "-o", out, "--cost", "best"), out, "--cost")
    with pytest.raises(OnnxZipError, match="--seed"):
        MergeOptions(cost="random", seed=-1)
    proc = _cli("merge", a, b, "--calib", calib, "-o", out, "--cost", "random", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
