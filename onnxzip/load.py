"""Load an ONNX file safely: external data kept inside the model's folder, checked, shapes inferred."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import OnnxZipError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex encoded."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _external_files(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The external data files of a model, each checked to lie inside the model's folder."""
    base = path.parent.resolve()
    files = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (base / location).resolve()
        if location.is_absolute() or not target.is_relative_to(base):
            raise OnnxZipError(
                f"{path}: initializer '{tensor.name}' points to external data '{info.location}', "
                "outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise OnnxZipError(f"{path}: external data file '{info.location}' of '{tensor.name}' is missing")
        files.append(target)
    return files


def load_model(path: str | Path) -> tuple[onnx.ModelProto, int]:
    """Load, check and shape-infer an ONNX model; returns it with its size on disk in bytes.

    External data is read only from files inside the model's own folder. Any problem raises
    OnnxZipError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxZipError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for corrupt bytes
        raise OnnxZipError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise OnnxZipError(f"{path}: not a readable ONNX model (it has no graph)")
    extra = _external_files(model, path)
    if extra:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise OnnxZipError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None
    size = path.stat().st_size + sum(f.stat().st_size for f in set(extra))
    return model, size
