"""Export a trained reference network to ONNX with torch's recommended exporter, and check the file.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export based, the one current torch
recommends), with a dynamic batch dimension ``N``, input ``input`` [N,1,28,28] float32 in [0,1] and
output ``logits`` [N,10]. The exporter writes a global average pool (torch's
``AdaptiveAvgPool2d(1)``) as ReduceMean over the spatial axes followed by a Reshape to [N,C];
:func:`export` rewrites that pair into the equivalent GlobalAveragePool and Flatten (exact; other
graphs are written as exported). The written file is checked three ways: the ONNX checker, ONNX
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
from onnx import helper, numpy_helper
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
    model = onnx.load(str(path))
    if _global_pool_rewrite(model):
        onnx.save(model, str(path))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values, by tensor name."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _global_pool_rewrite(model: onnx.ModelProto) -> int:
    """Turn ReduceMean over the spatial axes of a 4-D tensor (keepdims) into GlobalAveragePool, and
    a following Reshape to [-1, C] into Flatten(axis=1); both exact. Returns the nodes rewritten."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    graph, consts = model.graph, _constants(model.graph)
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    pooled: dict[str, int] = {}  # GlobalAveragePool output -> channels
    rewritten = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type == "ReduceMean" and len(node.input) == 2 and node.input[1] in consts:
            shape = shapes.get(node.input[0])
            axes = {int(a) % 4 for a in np.ravel(consts[node.input[1]])} if shape and len(shape) == 4 else None
            if axes == {2, 3} and attrs(node).get("keepdims", 1) == 1 and shape[1]:
                graph.node[i].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                        name=node.name))
                pooled[node.output[0]], rewritten = shape[1], rewritten + 1
        elif node.op_type == "Reshape" and node.input[0] in pooled and node.input[1] in consts:
            target = np.ravel(consts[node.input[1]]).tolist()
            if target == [-1, pooled[node.input[0]]]:
                graph.node[i].CopyFrom(helper.make_node("Flatten", [node.input[0]], list(node.output),
                                                        name=node.name, axis=1))
                rewritten += 1
    if rewritten:
        used = {t for n in graph.node for t in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
        for n in dead:
            graph.node.remove(n)
    return rewritten


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
