"""A canonical network without its weights, as plain JSON: the merged file keeps one per task
(format.KEY_NETWORKS), so that split can write a task with the original's structure (one Conv or
Gemm per layer, the file's own input and output) from the merged file's initializers.

Only the structure is kept: every step's kind, attributes and wiring, and the shapes of its weights,
which come back as zeros (emit.tied_from_weights fills them in). The metadata value is the JSON of
{task: network}, zlib-compressed and base64-encoded (pack, unpack): a few hundred bytes, which
matter for the smallest models.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any, Mapping

import numpy as np

from .ir import Layer, Network, Op, TensorSpec


BYTES_KEY = "bytes"  # an attribute value that is a byte string (an ONNX string attribute), as {BYTES_KEY: text}


def _plain(value: Any) -> Any:
    """An attribute value as JSON: tuples as lists, numpy scalars as numbers, bytes as {BYTES_KEY: text}."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {BYTES_KEY: value.decode("latin-1")}
    return value


def _frozen(value: Any) -> Any:
    """The attribute value _plain wrote, lists back as tuples."""
    if isinstance(value, dict):
        return str(value[BYTES_KEY]).encode("latin-1")
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _spec(spec: TensorSpec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": np.dtype(spec.dtype).str}


def _step(step: Layer | Op) -> dict:
    if isinstance(step, Layer):
        return {"layer": step.name, "kind": step.kind, "W": list(step.W.shape), "source": step.source,
                "strides": list(step.strides), "pads": list(step.pads), "dilations": list(step.dilations),
                "inputs": list(step.inputs), "output": step.output, "group": step.group}
    return {"op": step.op_type, "attrs": [[k, _plain(v)] for k, v in step.attrs], "source": step.source,
            "inputs": list(step.inputs), "output": step.output, "name": step.name,
            "params": [list(p.shape) for p in step.params]}


def to_json(net: Network) -> dict:
    """The network's structure as a JSON-ready dict (file name without folders; no weights)."""
    return {"file": net.path.replace("\\", "/").rsplit("/", 1)[-1], "sha256": net.sha256,
            "input": _spec(net.input), "output": _spec(net.output), "opset": net.opset,
            "ir_version": net.ir_version, "rescaled": net.rescaled, "steps": [_step(s) for s in net.steps]}


def _tensor(raw: dict) -> TensorSpec:
    return TensorSpec(str(raw["name"]), tuple(None if d is None else int(d) for d in raw["shape"]),
                      np.dtype(raw["dtype"]))


def _parsed_step(raw: dict) -> Layer | Op:
    wiring = {"inputs": tuple(str(n) for n in raw["inputs"]), "output": str(raw["output"])}
    if "layer" in raw:
        W = np.zeros([int(d) for d in raw["W"]], np.float32)
        return Layer(str(raw["layer"]), str(raw["kind"]), W, np.zeros(W.shape[0], np.float32), str(raw["source"]),
                     tuple(int(v) for v in raw["strides"]), tuple(int(v) for v in raw["pads"]),
                     tuple(int(v) for v in raw["dilations"]), group=int(raw["group"]), **wiring)
    params = tuple(np.zeros([int(d) for d in shape], np.float32) for shape in raw["params"])
    return Op(str(raw["op"]), tuple((str(k), _frozen(v)) for k, v in raw["attrs"]), str(raw["source"]),
              name=str(raw["name"]), params=params, **wiring)


def from_json(raw: dict) -> Network:
    """The network to_json described, every weight zero. Raises KeyError, TypeError or ValueError on a
    malformed description (the caller names the file)."""
    return Network(str(raw["file"]), str(raw["sha256"]), _tensor(raw["input"]), _tensor(raw["output"]),
                   tuple(_parsed_step(s) for s in raw["steps"]), int(raw["opset"]), int(raw["ir_version"]),
                   rescaled=bool(raw["rescaled"]))


def pack(networks: Mapping[str, dict]) -> str:
    """{task: to_json(network)} as the metadata value: compact JSON, zlib-compressed, base64."""
    text = json.dumps(dict(networks), separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def unpack(value: str) -> dict:
    """The {task: network description} that pack wrote; ValueError when it is not what pack writes."""
    try:
        raw = json.loads(zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True)))
    except (zlib.error, UnicodeError, ValueError) as exc:
        raise ValueError(f"not packed network descriptions ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("not a mapping of tasks to networks")
    return raw
