"""onnxzip: merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping)."""

import os as _os

__version__ = "0.1.0"

# ONNX Runtime's telemetry (a device id and an event database under ~/.cache/Microsoft) is
# switched off before any onnxzip module imports onnxruntime; runtime.session also disables its events.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

# OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s) after each multi-threaded product before
# they sleep. onnxzip alternates numpy's products with ONNX Runtime calls, and an ORT call made while a
# worker spun on one of two cores ran at about half speed (a 3x3 conv on 32 x 96 x 28 x 28: 20 ms after a
# GEMM, 11 ms alone). 2^20 cycles (under a millisecond) keeps the workers awake between back-to-back
# products (no product measured slower) and lets them sleep before ORT's turn. OpenBLAS reads the
# variable when it loads: it holds where onnxzip is imported before numpy (the CLI) and in every process
# started after the import; a value already set is kept.
OPENBLAS_THREAD_TIMEOUT = "20"
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
