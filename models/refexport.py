"""Export a trained reference network to ONNX with torch's recommended exporter, and check the file.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export based, the one current torch
recommends), with a dynamic batch dimension ``N``, input ``input`` [N,1,28,28] float32 in [0,1] and
output ``logits`` [N,10], and written as exported (a global average pool stays the ReduceMean over
the spatial axes and the Reshape to [N,C] that the exporter writes; onnxzip imports that form).
The written file is checked three ways: the ONNX checker, ONNX
Runtime's outputs against the torch module's on real test images, and onnxzip's own import (so
every reference model is one onnxzip can merge; the layer names are recorded).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from onnxzip.canonical import import_network
from refnets import IMAGE_SHAPE
from reftrain import logits

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "N"
# ONNX Runtime against torch on the same inputs (float32 logits of order 10).
MAX_ABS_DIFF = 1e-4
CHECK_SAMPLES = 2000


def export(net: nn.Module, path: Path) -> None:
    """Write net (eval mode) as a self-contained ONNX file with a dynamic batch size."""
    net.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = (torch.zeros(2, *IMAGE_SHAPE),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, example, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},))
    program.save(str(path), external_data=False)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(net: nn.Module, path: Path, x: np.ndarray) -> dict:
    """Check the exported file; returns the measured agreement with torch (raises if it fails)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    x = x[:CHECK_SAMPLES]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    want = logits(net, x)
    diff = float(np.max(np.abs(got - want)))
    same_top1 = float(np.mean(got.argmax(1) == want.argmax(1)))
    if not np.isfinite(got).all() or diff > MAX_ABS_DIFF:
        raise RuntimeError(f"{path}: ONNX Runtime differs from torch by {diff:.2e} (limit {MAX_ABS_DIFF:g})")
    result = {"ort_vs_torch_max_abs": diff, "ort_vs_torch_top1_agreement": same_top1, "samples": len(x)}
    result["onnxzip_layers"] = [layer.name for layer in import_network(path).layers]
    result["ops"] = sorted({n.op_type for n in model.graph.node})
    result["opset"] = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return result
