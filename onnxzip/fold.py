"""Constant folding at import: every subgraph whose inputs are all constants is evaluated once
(onnx-graphsurgeon's fold_constants, which runs it in ONNX Runtime), so that a weight an exporter
wrote as Transpose(initializer) or Reshape(initializer, shape) is a weight (DESIGN.md section 5)."""

from __future__ import annotations

from pathlib import Path

from contextlib import contextmanager
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs

from .errors import OnnxZipError, first_line
from .runtime import quiet_default_logger
from .save import EXTERNAL_DATA_ABOVE

# Ops that are constants themselves, and ops whose subgraphs are never folded here.
SOURCE_OPS = ("Constant",)
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def foldable(model: onnx.ModelProto) -> bool:
    """True when some node computes from constants only (initializers, also those an exporter lists
    as graph inputs as well; Constant nodes; and what such nodes compute)."""
    graph = model.graph
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in SOURCE_OPS:
            const.update(node.output)
            continue
        if node.op_type in CONTROL_FLOW_OPS or not any(node.input):
            continue
        if all(not name or name in const for name in node.input):
            return True
    return False


@contextmanager
def _quiet() -> Iterator[None]:
    """graphsurgeon's warnings (and those of the ONNX Runtime sessions it runs) kept off stderr."""
    quiet_default_logger()
    logger = gs.logger.G_LOGGER
    severity, logger.severity = logger.severity, logger.ERROR
    try:
        yield
    finally:
        logger.severity = severity


def fold_constants(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model with its constant subgraphs evaluated and removed, shapes inferred again; the model
    itself where nothing is constant or where it is above protobuf's limit (too large to round-trip)."""
    if not foldable(model) or model.ByteSize() > EXTERNAL_DATA_ABOVE:
        return model
    try:
        with _quiet():
            graph = gs.import_onnx(model)
            graph.fold_constants().cleanup()
            folded = gs.export_onnx(graph, do_type_check=False)
        folded.ir_version = model.ir_version
        del folded.opset_import[:]
        folded.opset_import.extend(model.opset_import)
        return onnx.shape_inference.infer_shapes(folded, strict_mode=True, data_prop=True)
    except Exception as exc:  # graphsurgeon and shape inference raise many types on odd graphs
        raise OnnxZipError(f"{path}: its constant subgraphs could not be folded ({first_line(exc)})") from None
