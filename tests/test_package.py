"""What importing onnxzip sets up (onnxzip/__init__.py): the environment of ONNX Runtime and OpenBLAS."""

from __future__ import annotations

import os
import subprocess
import sys

import onnxzip


def _env_after_import(env: dict[str, str]) -> str:
    code = "import onnxzip, os, numpy; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_openblas_workers_sleep_soon_unless_the_user_said_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    assert _env_after_import(env) == onnxzip.OPENBLAS_THREAD_TIMEOUT
    assert _env_after_import({**env, "OPENBLAS_THREAD_TIMEOUT": "26"}) == "26"


def test_telemetry_is_off():
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
