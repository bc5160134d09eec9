"""Shapes on every edge of a model onnxzip writes: ONNX shape inference over the main graph and every
If branch, so that a viewer (Netron) and a profiler (onnxsim's MAC count) see each tensor's shape.

Inference runs on a skeleton of the model: every graph's nodes, inputs and outputs, with each large
initializer replaced by its name, type and dims (inference reads no weight values), so a model of any
size costs memory in proportion to its graph, not to its weights. The inferred value_info is copied
back into the model's graphs, which the skeleton lists in the same order.
"""

from __future__ import annotations

from typing import Iterator

import onnx
from onnx import shape_inference

# Initializers of at most this many bytes keep their values in the skeleton: shape operands
# (Reshape's target, Slice's bounds) are small, and inference needs their values.
VALUE_BYTES = 1024


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, depth first in node order, every subgraph (If branches)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            for sub in attr.graphs:
                yield from graphs(sub)


def _stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's name, type and dims, or the tensor itself when it is small."""
    if tensor.ByteSize() <= VALUE_BYTES:
        return tensor
    return onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its large weights' values."""
    graph = model.graph
    skeleton_graph = onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                                     initializer=[_stub(t) for t in graph.initializer],
                                     sparse_initializer=graph.sparse_initializer)
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=skeleton_graph)
    for g in graphs(skeleton.graph):
        del g.value_info[:]
    return skeleton


def infer_edge_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every edge's value_info replaced by ONNX's inferred type and shape (in place).

    Raises onnx's InferenceError when the graph's shapes contradict each other (strict mode): a model
    onnxzip writes must not carry a shape that ONNX Runtime would refuse.
    """
    inferred = shape_inference.infer_shapes(_skeleton(model), strict_mode=True, data_prop=True)
    for target, source in zip(graphs(model.graph), graphs(inferred.graph), strict=True):
        del target.value_info[:]
        target.value_info.extend(source.value_info)
    return model
