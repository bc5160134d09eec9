"""ONNX Runtime sessions: the CUDA provider when asked for and present, the CPU provider otherwise."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxZipError
from .options import DEVICES
from .save import EXTERNAL_DATA_ABOVE
from .scratch import scratch_dir

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_LOG_ERRORS_ONLY = 3
ORT_LOG_FATAL_ONLY = 4
# Protobuf serialises at most 2 GiB: a larger in-memory model reaches ONNX Runtime as a file with
# external data (every tensor of at least SESSION_EXTERNAL_TENSOR_BYTES in the data file).
INLINE_MODEL_LIMIT = EXTERNAL_DATA_ABOVE
SESSION_EXTERNAL_TENSOR_BYTES = 1024


def _probe_model() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)],
                                  ir_version=8).SerializeToString()


def quiet_default_logger() -> None:
    """ONNX Runtime's default logger at errors only, also for the sessions other libraries create
    (graphsurgeon's constant folding); onnxzip's own sessions set this per session."""
    ort.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)


@lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """True when ONNX Runtime has the CUDA provider and a CUDA device answers."""
    if CUDA not in ort.get_available_providers():
        return False
    ort.disable_telemetry_events()
    ort.set_default_logger_severity(ORT_LOG_FATAL_ONLY)  # a missing CUDA library is expected here
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = ORT_LOG_FATAL_ONLY
        sess = ort.InferenceSession(_probe_model(), opts, providers=[CUDA, CPU])
        return CUDA in sess.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)


def resolve_device(device: str) -> tuple[list[str], str]:
    """Providers to use for a device request, and a one-line note on where the work runs."""
    if device not in DEVICES:
        raise OnnxZipError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device != "cpu" and cuda_usable():
        return [CUDA, CPU], "running on the GPU (ONNX Runtime CUDA provider)"
    if device == "cuda":
        return [CPU], "CUDA was asked for but no usable CUDA device was found; running on the CPU"
    return [CPU], "running on the CPU (ONNX Runtime CPU provider)"


def batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int,
            per_batch: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """``run`` on every sample of ``x``, batch by batch, the outputs concatenated; ``per_batch``
    (e.g. an argmax) reduces each batch's output first, so that only the reduced outputs are kept."""
    parts = []
    for s in range(0, len(x), batch_size):
        y = run(np.ascontiguousarray(x[s:s + batch_size]))
        parts.append(y if per_batch is None else per_batch(y))
    return np.concatenate(parts)


def session(model: onnx.ModelProto | bytes | str, providers: list[str]) -> ort.InferenceSession:
    """An inference session for an in-memory model or a model file (path given as str).

    A model above protobuf's limit goes through a temporary file with external data; its tensors
    are read back afterwards, so the model given is left as it was.
    """
    ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_LOG_ERRORS_ONLY
    # onnxzip alternates ONNX Runtime calls with numpy BLAS work; spinning ORT threads would
    # steal the cores the GEMMs need (VGG pair, 256 images: calibration 13.1 s with spinning, 9.5 s without).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto) and model.ByteSize() > INLINE_MODEL_LIMIT:
        return _session_via_file(model, opts, providers)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=providers)


def _session_via_file(model: onnx.ModelProto, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session of a large model saved with external data in a scratch folder (the save moves the
    tensors out of the proto; they are loaded back before returning)."""
    inline = [t for t in model.graph.initializer if not t.HasField("data_location")]
    with scratch_dir() as folder:
        path = folder / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=SESSION_EXTERNAL_TENSOR_BYTES)
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        finally:
            onnx.external_data_helper.load_external_data_for_model(model, str(folder))
            for tensor in inline:
                tensor.ClearField("data_location")
