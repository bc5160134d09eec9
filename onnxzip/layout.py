"""onnxzip layout: a merged model rewritten in the other layout (multi <-> gated), the same nodes, metadata
and initializers, each block stored once.

Tools that rework the gated layout's If branches can store a shared block more than once (onnxslim
moves an initializer that only branches use into each branch that uses it); run them on the multi
layout and gate the result with this command.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import OnnxZipError
from .format import GATED, KEY_LAYOUT, LAYOUTS, meta_key
from .gating import gate, ungate
from .guard import Output, check_outputs, model_reads
from .load import load_model
from .merged import read_meta
from .save import save_atomically


def _with_layout(model: onnx.ModelProto, layout: str) -> onnx.ModelProto:
    """The model with its layout metadata set to ``layout``."""
    for prop in model.metadata_props:
        if prop.key == meta_key(KEY_LAYOUT):
            prop.value = layout
    return model


def relayout(merged: str | Path, layout: str, output: str | Path) -> Path:
    """Write the merged model at ``merged`` in ``layout`` ('multi' or 'gated') to ``output`` (checked, and
    read back by read_meta). A model already in that layout is written as it is."""
    merged, output = Path(merged), Path(output)
    if layout not in LAYOUTS:
        raise OnnxZipError(f"--to must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    check_outputs([Output(output, "-o")], model_reads(merged, "the merged model"))
    model, _ = load_model(merged, runtime_ops=True)
    meta = read_meta(model, merged)
    if meta.layout != layout:
        try:
            model = gate(model, meta.tasks) if layout == GATED else ungate(model, meta.tasks)
        except ValueError as exc:
            raise OnnxZipError(f"{merged}: not a {meta.layout} model as onnxzip writes it: {exc}") from None
        model = _with_layout(model, layout)

    def check(path: Path) -> None:
        onnx.checker.check_model(str(path), full_check=True)
        read_meta(onnx.load(str(path)), path)
    save_atomically(model, output, check)
    return output

