"""ONNX Runtime sessions: telemetry off, and models above protobuf's limit through external data."""

import os
import subprocess
import sys
import tempfile

import numpy as np

import builders as B
from onnxzip import runtime


def test_a_model_above_the_inline_limit_runs_through_external_data_and_is_left_unchanged(monkeypatch, tmp_path):
    model = B.mlp_model(B.mlp_weights([64, 16, 10], 0))
    before = model.SerializeToString()
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    want = runtime.session(model, [runtime.CPU]).run(None, {"input": x})[0]
    monkeypatch.setattr(runtime, "INLINE_MODEL_LIMIT", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = runtime.session(model, [runtime.CPU]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)
    assert model.SerializeToString() == before
    assert not list(tmp_path.iterdir())  # the scratch folder is gone


def test_importing_onnxzip_turns_telemetry_off(tmp_path):
    """ONNX Runtime writes a device id and an event database under ~/.cache unless told not to."""
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    code = ("import onnxzip.runtime as r, builders as B; "
            "r.session(B.mlp_model(B.mlp_weights([4, 3], 0), in_shape=(1, 2, 2)), [r.CPU])")
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": os.path.dirname(B.__file__)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))
