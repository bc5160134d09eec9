"""Write outputs atomically: to a locked temporary file beside the target, checked, given the
user's umask, then renamed. Models above protobuf's 2 GB limit are written with external data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx

from .errors import OnnxZipError
from .scratch import temp_beside

# Protobuf cannot serialise a message of 2 GiB or more; above this many bytes a model is written
# as NAME plus NAME.data (every tensor of at least EXTERNAL_TENSOR_BYTES in the data file).
EXTERNAL_DATA_ABOVE = 2**31 - 2**26
EXTERNAL_TENSOR_BYTES = 1024
DATA_SUFFIX = ".data"
CREATED_MODE = 0o666
UMASK_FIELD = "Umask:"


def data_file(output: Path) -> Path:
    """The external-data file a model written at ``output`` may need (NAME.data beside it)."""
    return output.with_name(output.name + DATA_SUFFIX)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(UMASK_FIELD):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """The permissions a newly created file gets under the umask (temporary files are private)."""
    os.chmod(path, CREATED_MODE & ~_umask())


def _cannot_write(output: Path, exc: OSError) -> OnnxZipError:
    return OnnxZipError(f"{output}: cannot write ({exc.strerror or exc.__class__.__name__}); nothing was written")


def _save_inline(model: onnx.ModelProto, output: Path, check: Callable[[Path], None] | None) -> tuple[Path, ...]:
    with temp_beside(output) as tmp:
        onnx.save_model(model, str(tmp))
        if check is not None:
            check(tmp)
        _publish_mode(tmp)
        os.replace(tmp, output)
    return (output,)


def _save_external(model: onnx.ModelProto, output: Path, check: Callable[[Path], None] | None) -> tuple[Path, ...]:
    """NAME and NAME.data, written and checked together in a temporary folder, the data renamed first.

    The model's tensors are moved to external references in place (no second copy in memory).
    """
    data = data_file(output)
    with temp_beside(output, folder=True) as tmp:
        model_tmp, data_tmp = tmp / output.name, tmp / data.name
        onnx.save_model(model, str(model_tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=EXTERNAL_TENSOR_BYTES)
        onnx.checker.check_model(str(model_tmp), full_check=True)
        if check is not None:
            check(model_tmp)
        for path in (model_tmp, data_tmp):
            _publish_mode(path)
        os.replace(data_tmp, data)
        os.replace(model_tmp, output)
    return (output, data)


def save_atomically(model: onnx.ModelProto, output: Path,
                    check: Callable[[Path], None] | None = None) -> tuple[Path, ...]:
    """Save ``model`` to ``output``; ``check`` runs on the saved temporary file first. Returns the
    files written: the model, and its external-data file where one was needed.

    If saving or the check fails (disk full, a signal, a failed check), no file is left at
    ``output`` (nor a temporary one); write errors raise OnnxZipError naming the output.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if model.ByteSize() > EXTERNAL_DATA_ABOVE:
            return _save_external(model, output, check)
        return _save_inline(model, output, check)
    except OSError as exc:
        raise _cannot_write(output, exc) from None


def write_text_atomically(text: str, output: Path) -> None:
    """Write ``text`` to ``output`` through a temporary file (all or nothing), with the umask's mode."""
    write_bytes_atomically(text.encode(), output)


def write_bytes_atomically(data: bytes, output: Path) -> None:
    """Write ``data`` to ``output`` through a temporary file (all or nothing), with the umask's mode."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with temp_beside(output) as tmp:
            tmp.write_bytes(data)
            _publish_mode(tmp)
            os.replace(tmp, output)
    except OSError as exc:
        raise _cannot_write(output, exc) from None
