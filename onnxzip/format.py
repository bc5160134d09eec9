"""The merged file's contract: its metadata keys, its fixed tensor and node names, and how its
parameters are counted. emit writes through these names; merged, verify, api and the retraining
bridge read through them. A leaf module: it imports nothing of onnxzip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# ModelProto.producer_name of every file onnxzip writes (producer_version: the onnxzip version).
PRODUCER = "onnxzip"
# A merged file's node doc_string: this prefix, then the node's unit group and its tasks.
NODE_DOC_PREFIX = "onnxzip group: "
# Metadata: every key is META_PREFIX + one of these names.
META_PREFIX = "onnxzip."
KEY_VERSION = "version"
KEY_TASKS = "tasks"  # JSON list of task names, in input order
KEY_SOURCES = "sources"  # JSON {task: {file, sha256, params, bytes, output[, input_scale]}}
KEY_LAYOUT = "layout"
KEY_SHARING = "sharing"  # a one-line summary per layer
KEY_PLAN = "plan"  # the SharingPlan as JSON
KEY_RETRAIN = "retrain"  # JSON list of retraining runs
KEY_TASK = "task"  # of a model split out of a merged one: its task,
KEY_SPLIT_FROM = "split_from"  # and the merged file's name
KEY_QUANTIZED = "quantized"  # of a model onnxzip quantize wrote: how
KEY_NETWORKS = "networks"  # {task: its canonical network without weights} for split (skeleton.pack: JSON, zlib, base64)

# Layouts: one input and one output per task, or a task input selecting one task's branch.
MULTI, GATED = "multi", "gated"
LAYOUTS = (MULTI, GATED)
TASK_INPUT = "task"  # the gated layout's int64 scalar task index
GATED_OUTPUT = "output"
# The gated layout's branch for a task index outside 0..N-1 (emit._out_of_range): its failing
# node, the nodes that build its impossible shape, and its constants.
TASK_OUT_OF_RANGE = "task.out_of_range"
TASK_AS_DIMS = "task.as_dims"
TASK_BAD_SHAPE = "task.bad_shape"
TASK_ONE_DIM = "const.task.one_dim"
TASK_REST = "const.task.rest"
TASK_PROBE = "const.task.probe"

# Initializers named CONST_PREFIX... are helper constants (task indices, clip bounds), not weights.
CONST_PREFIX = "const."
# Graph inputs and outputs of a segment model (calibration): the tensors live at its boundary.
LIVE_PREFIX = "live."


def meta_key(name: str) -> str:
    """The metadata_props key of ``name`` (one of the KEY_* names)."""
    return META_PREFIX + name


def task_index_name(t: int) -> str:
    """The constant that the gated layout compares the task input with to select task ``t``."""
    return f"{CONST_PREFIX}task_{t}"


def weight_params(model: onnx.ModelProto) -> int:
    """Number of layer weights and biases stored in a written model (helper constants excluded)."""
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if not t.name.startswith(CONST_PREFIX)))
