"""Write a model atomically: to a temporary file beside the target, checked, then renamed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import onnx


def save_atomically(model: onnx.ModelProto, output: Path, check: Callable[[Path], None] | None = None) -> None:
    """Save ``model`` to ``output``; ``check`` runs on the saved temporary file first.

    If saving or the check fails, no file is left at ``output`` (nor a temporary one).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
