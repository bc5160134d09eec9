"""The gated layout's If chain, built from a graph's nodes and the tasks each node serves, and the way
back: a gated model inlined into the multi layout.

Each node goes where every task that needs it can reach it: what all remaining tasks need runs
before the test of the next task (``task.is_NAME``), the rest inside that test's branches, and past
the last task's test lies a branch that fails for any other index. emit builds its gated layout with
``gated_nodes``; ``gate`` and ``ungate`` turn a written model from one layout into the other, so that
a tool that cannot handle an If (ONNX Runtime's quantizers) works on the multi form and the result
is gated again, with nothing in a branch reading a tensor that the tool renamed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .format import (GATED_OUTPUT, TASK_AS_DIMS, TASK_BAD_SHAPE, TASK_INPUT, TASK_ONE_DIM, TASK_OUT_OF_RANGE, TASK_PROBE,
                     TASK_REST, task_index_name)
from .shapes import graphs


def _const(tensors: dict[str, gs.Tensor], name: str, value: np.ndarray) -> gs.Tensor:
    return tensors.setdefault(name, gs.Constant(name, value))


def _out_of_range(tensors: dict[str, gs.Tensor], task: gs.Tensor) -> gs.Graph:
    """The branch past the last task's test: it reshapes one value to [task, -1], which no index outside
    0..N-1 (N >= 2) allows: 1 is not a multiple of a task >= 2, and a negative task is no dimension. A
    Reshape's target shape is checked on the host by every execution provider, unlike a Gather's indices
    on a GPU."""
    dims = gs.Variable(TASK_AS_DIMS, dtype=np.int64, shape=[1])
    shape = gs.Variable(TASK_BAD_SHAPE, dtype=np.int64, shape=[2])
    bad = gs.Variable(TASK_OUT_OF_RANGE, dtype=np.float32, shape=[None, None])
    nodes = [gs.Node("Reshape", TASK_AS_DIMS, inputs=[task, _const(tensors, TASK_ONE_DIM, np.ones(1, np.int64))],
                     outputs=[dims]),
             gs.Node("Concat", TASK_BAD_SHAPE, {"axis": 0},
                     inputs=[dims, _const(tensors, TASK_REST, np.full(1, -1, np.int64))], outputs=[shape]),
             gs.Node("Reshape", TASK_OUT_OF_RANGE, inputs=[_const(tensors, TASK_PROBE, np.ones(1, np.float32)), shape],
                     outputs=[bad])]
    return gs.Graph(nodes=nodes, outputs=[bad], name="branch_" + TASK_OUT_OF_RANGE.replace(".", "_"))


class _Chain:
    """What the If chain is built from: the nodes in order, the tasks each serves, each task's final tensor."""

    def __init__(self, nodes: Sequence[gs.Node], users: Sequence[frozenset], finals: Sequence[gs.Tensor],
                 names: Sequence[str], task: gs.Tensor, tensors: dict[str, gs.Tensor], head_shape):
        self.nodes, self.users, self.finals, self.names = list(nodes), list(users), list(finals), list(names)
        self.task, self.tensors, self.head_shape = task, tensors, head_shape

    def build(self, tasks: list[int], placed: frozenset, out: gs.Variable, tested: bool = False) -> list[gs.Node]:
        """Nodes for the tasks still possible here: what all of them need, then an If on the task input.
        ``tested``: the one task left was selected by the If above."""
        nodes: list[gs.Node] = []
        if len(tasks) > 1 or tested:  # the last task's own nodes wait behind its test
            here = [i for i, u in enumerate(self.users) if i not in placed and set(tasks) <= u]
            placed = placed | set(here)
            nodes = [self.nodes[i] for i in here]
        if tested:
            return nodes + [gs.Node("Identity", f"{self.names[tasks[0]]}.output", inputs=[self.finals[tasks[0]]],
                                    outputs=[out])]
        first = tasks[0]
        name = self.names[first]
        index = _const(self.tensors, task_index_name(first), np.array(first, np.int64))
        cond = gs.Variable(f"task.is_{name}", dtype=np.bool_, shape=[])
        nodes.append(gs.Node("Equal", f"task.is_{name}", inputs=[self.task, index], outputs=[cond]))
        then_out = gs.Variable(f"{name}.branch_out", dtype=np.float32, shape=self.head_shape)
        then = gs.Graph(nodes=self.build([first], placed, then_out, tested=True), outputs=[then_out],
                        name=f"branch_{name}")
        if len(tasks) > 1:
            rest = tasks[1:]
            else_out = gs.Variable(f"after_{name}.branch_out", dtype=np.float32, shape=self.head_shape)
            other = gs.Graph(nodes=self.build(rest, placed, else_out), outputs=[else_out],
                             name="branch_" + "_".join(self.names[t] for t in rest))
        else:
            other = _out_of_range(self.tensors, self.task)
        nodes.append(gs.Node("If", f"select_{name}", {"then_branch": then, "else_branch": other},
                             inputs=[cond], outputs=[out]))
        return nodes


def gated_nodes(nodes: Sequence[gs.Node], users: Sequence[frozenset], finals: Sequence[gs.Tensor],
                names: Sequence[str], task: gs.Tensor, tensors: dict[str, gs.Tensor], out: gs.Variable,
                head_shape) -> list[gs.Node]:
    """The main graph's nodes of the gated layout: ``nodes[i]`` serves the tasks ``users[i]`` (indices into
    ``names``); task t's result is ``finals[t]``; ``out`` the graph output; new constants go into ``tensors``."""
    return _Chain(nodes, users, finals, names, task, tensors, head_shape).build(list(range(len(names))),
                                                                               frozenset(), out)


def node_tasks(graph: gs.Graph) -> list[frozenset]:
    """Per node of a multi-layout graph (outputs in task order), the tasks whose output it feeds."""
    producer = {id(o): i for i, n in enumerate(graph.nodes) for o in n.outputs}
    users = [set() for _ in graph.nodes]
    for t, out in enumerate(graph.outputs):
        stack = [producer[id(out)]] if id(out) in producer else []
        while stack:
            i = stack.pop()
            if t in users[i]:
                continue
            users[i].add(t)
            stack.extend(producer[id(x)] for x in graph.nodes[i].inputs if id(x) in producer)
    return [frozenset(u) for u in users]


def tensor_tasks(model: onnx.ModelProto) -> dict[str, frozenset]:
    """Per tensor a node of a multi-layout model writes, the tasks (output indices) whose output it feeds."""
    graph = gs.import_onnx(model)
    return {o.name: users for node, users in zip(graph.nodes, node_tasks(graph)) for o in node.outputs}


def hoist_initializers(model: onnx.ModelProto) -> None:
    """Move initializers of If branches into the main graph, so each one is stored exactly once."""
    main = model.graph
    seen = {t.name for t in main.initializer}
    for sub in list(graphs(main))[1:]:
        for t in sub.initializer:
            if t.name not in seen:
                main.initializer.append(t)
                seen.add(t.name)
        del sub.initializer[:]


def _finish(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as a model with ``like``'s IR version, producer, description and metadata."""
    model = gs.export_onnx(graph.cleanup(), do_type_check=False)
    hoist_initializers(model)
    model.ir_version, model.producer_name, model.producer_version = like.ir_version, like.producer_name, \
        like.producer_version
    model.doc_string = like.doc_string
    model.metadata_props.extend(like.metadata_props)
    return model


def gate(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A multi-layout model (one output per task, in ``names`` order) in the gated layout."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    task = gs.Variable(TASK_INPUT, dtype=np.int64, shape=[])
    shapes = [o.shape for o in graph.outputs]
    head = shapes[0] if all(s == shapes[0] for s in shapes) else [shapes[0][0] if shapes[0] else None, "classes"]
    out = gs.Variable(GATED_OUTPUT, dtype=np.float32, shape=head)
    finals = list(graph.outputs)
    nodes = gated_nodes(graph.nodes, node_tasks(graph), finals, names, task, tensors, out, head)
    gated = gs.Graph(nodes=nodes, inputs=list(graph.inputs) + [task], outputs=[out], opset=graph.opset,
                     name=graph.name, import_domains=graph.import_domains)
    return _finish(gated, model)


def _inline(nodes: Sequence[gs.Node], finals: list[gs.Tensor]) -> list[gs.Node]:
    """The nodes of a gated graph with every If's branches inlined, in order; each task's result is appended
    to ``finals`` (the tensor its branch's Identity reads), the task tests and the failing branch dropped."""
    kept = []
    for node in nodes:
        if node.op == "If":
            then, other = node.attrs["then_branch"], node.attrs["else_branch"]
            kept += _inline(then.nodes, finals)
            if other.outputs[0].name != TASK_OUT_OF_RANGE:
                kept += _inline(other.nodes, finals)
        elif node.op == "Identity" and node.name.endswith(".output") and node.outputs[0].name.endswith(".branch_out"):
            finals.append(node.inputs[0])
        elif not node.name.startswith("task."):
            kept.append(node)
    return kept


def ungate(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A gated-layout model in the multi layout: one input, one output per task (named as in ``names``).
    Raises ValueError when the If chain does not end in one branch per task (a file edited by hand)."""
    graph = gs.import_onnx(model)
    finals: list[gs.Tensor] = []
    nodes = _inline(graph.nodes, finals)
    if len(finals) != len(names):
        raise ValueError(f"its If chain ends in {len(finals)} task branches for {len(names)} tasks")
    for t, (var, name) in enumerate(zip(finals, names)):
        var.name, var.dtype = name, np.float32
    inputs = [i for i in graph.inputs if i.name != TASK_INPUT]
    multi = gs.Graph(nodes=nodes, inputs=inputs, outputs=finals, opset=graph.opset, name=graph.name,
                     import_domains=graph.import_domains)
    return _finish(multi, model)
