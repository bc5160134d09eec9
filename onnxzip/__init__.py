"""onnxzip: merge pre-trained ONNX networks into one multi-task model (Multi-Task Zipping)."""

import os as _os

__version__ = "0.1.0"

# ONNX Runtime's telemetry (a device id and an event database under ~/.cache/Microsoft) is
# switched off before any onnxzip module imports onnxruntime; runtime.session also disables its events.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
