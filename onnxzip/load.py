"""Load an ONNX file safely: validated first, external data kept inside the model's folder, checked,
shapes inferred, and opened once by ONNX Runtime, so a hostile or unusual file is refused here
with one OnnxZipError naming the file and the tensor or node at fault, before any work is done.

Import also normalises what the checker accepts but ONNX Runtime does not: node names are made
unique (within each graph) and unused sparse initializers are dropped.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxZipError, first_line
from .runtime import CPU, ORT_LOG_FATAL_ONLY

# Above this many bytes (model file plus external data) a model is checked and shape-inferred from
# its path: protobuf cannot serialise a message of 2 GiB, which in-memory checking needs. The margin
# leaves room for what shape inference adds.
IN_MEMORY_LIMIT_BYTES = 2**31 - 2**26
# IR version 3 introduced opset imports; older files cannot say which operators they mean.
MIN_IR_VERSION = 3
DEFAULT_DOMAINS = ("", "ai.onnx")
# ONNX Runtime's own operators (QGemm, QLinearAdd, ... as its quantizers write them), opset 1.
ORT_DOMAIN, ORT_DOMAIN_VERSION = "com.microsoft", 1
EXTERNAL_KEYS = ("location", "offset", "length", "checksum", "basepath")
# offset and length of external data: plain decimal digits (no sign, no spaces, no exponent).
DECIMAL = re.compile(r"[0-9]{1,20}")
# Element types packed several to a byte, and their bits per element (those this onnx has).
PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
               (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
               if hasattr(onnx.TensorProto, name)}
COMPLEX_TYPES = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
# Suffix of a node renamed on import because an earlier node has its name: 'relu' -> 'relu_2'.
RENAME_FORMAT = "{name}_{n}"
READ_CHUNK_BYTES = 1 << 20
# ONNX Runtime's error text: "[ONNXRuntimeError] : 1 : FAIL : Load model from X failed:" and a
# C++ source location ("/onnxruntime_src/.../file.h:46 void f(args) ") before the reason.
ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .*? failed:)?")
ORT_SOURCE_LOCATION = re.compile(r"^\S+\.(h|cc|cpp):\d+ [^(]*\([^)]*\)\s*")


@dataclass(frozen=True)
class _External:
    """One tensor's validated external data: which bytes of which file."""

    tensor: onnx.TensorProto
    where: str
    file: Path
    offset: int
    length: int


@dataclass
class Loaded:
    """A model as load() imports it: checked, shape-inferred, external data read in."""

    model: onnx.ModelProto
    size: int  # bytes on disk: the model file and its external-data files
    data_files: tuple[str, ...]  # the external-data files read (absolute paths), sorted
    large: bool  # above IN_MEMORY_LIMIT_BYTES: checked and inferred via the path
    changed: bool  # import changed what ORT would see in the file (external data, names, sparse)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex encoded."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- walking the model --------------------------------------------------------------------------

def _node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _subgraphs(nodes) -> list[onnx.GraphProto]:
    """The graphs held by the nodes' attributes (If branches, Loop and Scan bodies)."""
    return [g for node in nodes for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)]


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph, also those inside model-local functions (no recursion)."""
    stack = [model.graph, *_subgraphs(n for f in model.functions for n in f.node)]
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(_subgraphs(graph.node))


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: of every graph and subgraph and of model-local functions."""
    for graph in _graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every dense tensor with what it is, for messages: initializers and tensor attributes of nodes."""
    for graph in _graphs(model):
        for tensor in graph.initializer:
            yield tensor, f"initializer '{tensor.name}'"
    for node in _all_nodes(model):
        for attr in node.attribute:
            values = [attr.t] if attr.type == onnx.AttributeProto.TENSOR else attr.tensors
            for tensor in values:
                yield tensor, f"tensor '{tensor.name or attr.name}' of node '{_node_name(node)}'"


# --- the file and its message ------------------------------------------------------------------

def _read_proto(path: Path) -> onnx.ModelProto:
    """The file's ModelProto without external data, refusing what is not a model file."""
    if path.is_dir():
        raise OnnxZipError(f"{path}: is a folder, not an ONNX model file")
    if not path.exists():
        raise OnnxZipError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxZipError(f"{path}: is not a regular file")
    if path.stat().st_size == 0:
        raise OnnxZipError(f"{path}: is empty (0 bytes), not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise OnnxZipError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None
    except Exception as exc:  # protobuf raises several types for corrupt bytes
        raise OnnxZipError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise OnnxZipError(f"{path}: not a readable ONNX model (it has no graph)")
    return model


@lru_cache(maxsize=None)
def _known_opsets() -> dict[str, int]:
    """The newest opset version of each operator domain the installed onnx defines."""
    known = {domain: onnx.defs.onnx_opset_version() for domain in DEFAULT_DOMAINS}
    known[onnx.defs.ONNX_ML_DOMAIN] = onnx.defs.onnx_ml_opset_version()
    for schema in onnx.defs.get_all_schemas_with_history():
        known[schema.domain] = max(known.get(schema.domain, 0), schema.since_version)
    return known


def _check_versions(model: onnx.ModelProto, path: Path, runtime_ops: bool = False) -> None:
    """IR version and opset imports the installed onnx knows; nodes only in known domains (and, with
    ``runtime_ops``, ONNX Runtime's own)."""
    if not MIN_IR_VERSION <= model.ir_version <= onnx.IR_VERSION:
        raise OnnxZipError(f"{path}: has IR version {model.ir_version}; onnx {onnx.__version__} reads IR versions "
                           f"{MIN_IR_VERSION} to {onnx.IR_VERSION}")
    known, seen = _known_opsets(), set()
    if runtime_ops:
        known.setdefault(ORT_DOMAIN, ORT_DOMAIN_VERSION)
    for opset in model.opset_import:
        domain = "" if opset.domain in DEFAULT_DOMAINS else opset.domain
        if domain in seen:
            raise OnnxZipError(f"{path}: imports operator domain '{opset.domain}' twice")
        seen.add(domain)
        if domain in known and not 1 <= opset.version <= known[domain]:
            raise OnnxZipError(f"{path}: imports opset {opset.version} of domain '{opset.domain or 'ai.onnx'}'; "
                               f"onnx {onnx.__version__} knows versions 1 to {known[domain]}")
    if "" not in seen:
        raise OnnxZipError(f"{path}: imports no opset of the default domain 'ai.onnx'")
    local = {f.domain for f in model.functions}
    for node in _all_nodes(model):
        if node.domain not in known:
            what = "a model-local function of domain" if node.domain in local else "operator domain"
            raise OnnxZipError(f"{path}: node '{_node_name(node)}' ({node.op_type}) uses {what} '{node.domain}', "
                               f"which onnx {onnx.__version__} does not define; only standard ONNX operators "
                               "are supported")


def _check_value(vi: onnx.ValueInfoProto, what: str, path: Path) -> None:
    """A graph input or output: a tensor of a known element type."""
    kind = vi.type.WhichOneof("value") if vi.HasField("type") else None
    if kind is None:
        raise OnnxZipError(f"{path}: {what} '{vi.name}' has no type")
    if kind != "tensor_type":
        raise OnnxZipError(f"{path}: {what} '{vi.name}' is a {kind.removesuffix('_type').replace('_', ' ')}, "
                           "not a tensor; only tensor inputs and outputs are supported")
    elem = vi.type.tensor_type.elem_type
    if elem == onnx.TensorProto.UNDEFINED or elem not in onnx.TensorProto.DataType.values():
        raise OnnxZipError(f"{path}: {what} '{vi.name}' has no valid element type ({elem})")


def _check_interface(graph: onnx.GraphProto, path: Path) -> None:
    """At least one computed input and one output, each a typed tensor."""
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    if not inputs:
        raise OnnxZipError(f"{path}: the graph has no inputs (other than initializers)")
    if not graph.output:
        raise OnnxZipError(f"{path}: the graph has no outputs")
    for vi in inputs:
        _check_value(vi, "input", path)
    for vi in graph.output:
        _check_value(vi, "output", path)


# --- sparse initializers ----------------------------------------------------------------------

def _used_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name some node (of any graph) reads, and the main graph's outputs."""
    return {name for node in _all_nodes(model) for name in node.input} | {o.name for o in model.graph.output}


def _check_sparse(model: onnx.ModelProto, path: Path) -> None:
    """Refuse sparse tensors that are used: onnxzip reads dense weights only (ORT would densify them)."""
    used = _used_names(model)
    for sparse in model.graph.sparse_initializer:
        if sparse.values.name in used:
            dims = list(sparse.dims)
            raise OnnxZipError(f"{path}: sparse initializer '{sparse.values.name}' (dims {dims}) is used; sparse "
                               "initializers are not supported, store it as a dense initializer")
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise OnnxZipError(f"{path}: node '{_node_name(node)}' ({node.op_type}) has a sparse tensor "
                                   f"attribute '{attr.name}'; sparse tensors are not supported")


def _drop_unused_sparse(model: onnx.ModelProto) -> bool:
    """Remove the sparse initializers no node reads (after _check_sparse, that is all of them)."""
    dropped = {s.values.name for s in model.graph.sparse_initializer}
    if not dropped:
        return False
    del model.graph.sparse_initializer[:]
    kept = [vi for vi in model.graph.input if vi.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return True


# --- tensor sizes -----------------------------------------------------------------------------

def _element_bits(data_type: int) -> int | None:
    """Bits per element of a fixed-size element type; None for strings and unknown types."""
    if data_type in PACKED_BITS:
        return PACKED_BITS[data_type]
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return None


def _elements(tensor: onnx.TensorProto, where: str, path: Path) -> int:
    if any(d < 0 for d in tensor.dims):
        raise OnnxZipError(f"{path}: {where} has a negative dimension in its shape {list(tensor.dims)}")
    return math.prod(tensor.dims)


def _data_bytes(tensor: onnx.TensorProto, where: str, path: Path) -> int:
    """Bytes the tensor's shape and element type need as raw data."""
    bits = _element_bits(tensor.data_type)
    if bits is None:
        raise OnnxZipError(f"{path}: {where} has element type {tensor.data_type}, which cannot be stored as "
                           "raw or external data")
    return -(-_elements(tensor, where, path) * bits // 8)


def _check_inline_size(tensor: onnx.TensorProto, where: str, path: Path) -> None:
    """Inline data of exactly the size the shape and element type need (the checker allows too much)."""
    if tensor.HasField("raw_data"):
        need, have = _data_bytes(tensor, where, path), len(tensor.raw_data)
        if have != need:
            raise OnnxZipError(f"{path}: {where} has {have} bytes of raw data; its shape {list(tensor.dims)} and "
                               f"type {onnx.TensorProto.DataType.Name(tensor.data_type)} need {need}")
        return
    if (tensor.data_type in PACKED_BITS or tensor.data_type == onnx.TensorProto.UNDEFINED
            or tensor.data_type not in onnx.TensorProto.DataType.values()):
        return  # packed typed data, or a type the checker refuses
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    need = _elements(tensor, where, path) * (2 if tensor.data_type in COMPLEX_TYPES else 1)
    have = len(getattr(tensor, field))
    if have != need:
        raise OnnxZipError(f"{path}: {where} has {have} values in {field}; its shape {list(tensor.dims)} needs {need}")


# --- external data ----------------------------------------------------------------------------

def _entries(tensor: onnx.TensorProto, where: str, path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise OnnxZipError(f"{path}: {where} gives its external data '{entry.key}' twice")
        entries[entry.key] = entry.value
    return {k: v for k, v in entries.items() if k in EXTERNAL_KEYS}


def _external_file(location: str, where: str, path: Path) -> Path:
    """The data file of an external location, refused unless a regular file inside the model's folder."""
    if not location:
        raise OnnxZipError(f"{path}: {where} has external data but no location")
    if "\0" in location:
        raise OnnxZipError(f"{path}: {where} has an external data location with a NUL character")
    base = path.parent.resolve()
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise OnnxZipError(f"{path}: {where}: external data '{location}' cannot be resolved "
                           f"({first_line(exc)})") from None
    if Path(location).is_absolute() or not target.is_relative_to(base):
        raise OnnxZipError(f"{path}: {where} points to external data '{location}', outside the model's folder; "
                           "refusing to read it")
    if target.is_dir():
        raise OnnxZipError(f"{path}: {where}: external data '{location}' is a folder, not a file")
    if not target.exists():
        raise OnnxZipError(f"{path}: external data file '{location}' of {where} is missing")
    if not target.is_file():
        raise OnnxZipError(f"{path}: {where}: external data '{location}' is not a regular file")
    return target


def _decimal(entries: dict[str, str], key: str, where: str, path: Path) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not DECIMAL.fullmatch(value):
        raise OnnxZipError(f"{path}: {where} has external data {key} '{value}', not a non-negative integer")
    return int(value)


def _external(tensor: onnx.TensorProto, where: str, path: Path) -> _External:
    """One tensor's external data, validated against the file and the tensor's shape and type."""
    entries = _entries(tensor, where, path)
    file = _external_file(entries.get("location", ""), where, path)
    offset = _decimal(entries, "offset", where, path) or 0
    length = _decimal(entries, "length", where, path)
    size = file.stat().st_size
    if length is None:
        length = max(size - offset, 0)
    if offset + length > size:
        raise OnnxZipError(f"{path}: {where}: external data at offset {offset}, length {length} lies beyond the "
                           f"end of '{entries['location']}' ({size} bytes)")
    need = _data_bytes(tensor, where, path)
    if length != need:
        raise OnnxZipError(f"{path}: {where} has {length} bytes of external data; its shape {list(tensor.dims)} "
                           f"and type {onnx.TensorProto.DataType.Name(tensor.data_type)} need {need}")
    return _External(tensor, where, file, offset, length)


def _check_disjoint(refs: list[_External], path: Path) -> None:
    """No two tensors read the same bytes: aliased ranges could make a small file fill any memory."""
    last: dict[Path, _External] = {}
    for ref in sorted(refs, key=lambda r: (r.file, r.offset)):
        prev = last.get(ref.file)
        if prev is not None and ref.offset < prev.offset + prev.length and ref.length:
            raise OnnxZipError(f"{path}: {ref.where} and {prev.where} read the same bytes of external data "
                               f"'{ref.file.name}' (offsets {prev.offset} and {ref.offset})")
        if ref.length:
            last[ref.file] = ref


def _check_tensors(model: onnx.ModelProto, path: Path) -> list[_External]:
    """Validate every tensor's data (inline sizes, external entries); returns the external ones."""
    refs = []
    for tensor, where in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            refs.append(_external(tensor, where, path))
        else:
            _check_inline_size(tensor, where, path)
    _check_disjoint(refs, path)
    return refs


def _read_external(refs: list[_External], path: Path) -> None:
    """Read validated external data into the tensors (then they no longer point to files)."""
    for ref in refs:
        try:
            with open(ref.file, "rb") as fh:
                fh.seek(ref.offset)
                data = fh.read(ref.length)
        except OSError as exc:
            raise OnnxZipError(f"{path}: {ref.where}: cannot read external data '{ref.file.name}' "
                               f"({exc.strerror or first_line(exc)})") from None
        if len(data) != ref.length:
            raise OnnxZipError(f"{path}: {ref.where}: external data '{ref.file.name}' ended early")
        ref.tensor.raw_data = data
        ref.tensor.data_location = onnx.TensorProto.DEFAULT
        del ref.tensor.external_data[:]


# --- checking, shape inference, names ----------------------------------------------------------

def _check_in_memory(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise OnnxZipError(f"{path}: invalid ONNX model ({first_line(exc)})") from None


def _check_from_path(path: Path) -> onnx.ModelProto:
    """Check and shape-infer a model too large for protobuf in memory, via its path; its tensors stay external."""
    with tempfile.TemporaryDirectory(prefix="onnxzip-load-") as tmp:
        inferred = os.path.join(tmp, path.name)
        try:
            onnx.checker.check_model(str(path))
            onnx.shape_inference.infer_shapes_path(str(path), inferred, strict_mode=True, data_prop=True)
        except Exception as exc:
            raise OnnxZipError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
        return onnx.load(inferred, load_external_data=False)


def _unique_node_names(model: onnx.ModelProto) -> bool:
    """Rename nodes whose name an earlier node of the same graph has: 'relu' -> 'relu_2', then 'relu_3'
    (skipping names taken); unnamed nodes stay unnamed. Returns True when any node was renamed."""
    renamed = False
    for graph in _graphs(model):
        taken = {n.name for n in graph.node if n.name}
        seen: set[str] = set()
        next_suffix: dict[str, int] = {}  # per name, where the search for a free suffix resumes
        for node in graph.node:
            if node.name and node.name in seen:
                k = next_suffix.get(node.name, 2)
                while RENAME_FORMAT.format(name=node.name, n=k) in taken:
                    k += 1
                next_suffix[node.name] = k + 1
                node.name = RENAME_FORMAT.format(name=node.name, n=k)
                taken.add(node.name)
                renamed = True
            seen.add(node.name)
    return renamed


def _import(path: Path, check_runtime: bool, runtime_ops: bool = False) -> Loaded:
    """Validate, read, check, shape-infer and normalise a model file; with ``check_runtime``, also open
    it in ONNX Runtime (a large model before its weights are read, so one copy is in memory at a time);
    with ``runtime_ops``, ONNX Runtime's own operators are accepted."""
    model = _read_proto(path)
    _check_versions(model, path, runtime_ops)
    _check_interface(model.graph, path)
    _check_sparse(model, path)
    refs = _check_tensors(model, path)
    files = sorted({r.file for r in refs})
    size = path.stat().st_size + sum(f.stat().st_size for f in files)
    large = size > IN_MEMORY_LIMIT_BYTES
    if large:
        model = _check_from_path(path)
        if check_runtime:
            _check_runtime(str(path), path)
        refs = _check_tensors(model, path)
        _read_external(refs, path)
    else:
        _read_external(refs, path)
        model = _check_in_memory(model, path)
    dropped = _drop_unused_sparse(model)
    renamed = _unique_node_names(model)
    loaded = Loaded(model, size, tuple(map(str, files)), large, bool(files) or dropped or renamed)
    if check_runtime and not large:
        _check_runtime(_runtime_input(loaded, path), path)
    return loaded


# --- ONNX Runtime -----------------------------------------------------------------------------

def _runtime_input(loaded: Loaded, path: Path) -> str | bytes:
    """The file itself when ORT can be shown it as it is, else the imported model's bytes."""
    if loaded.large or not loaded.changed:
        return str(path)
    return loaded.model.SerializeToString()


def _ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's first line of error text without its error-code prefix and C++ source location."""
    line = ORT_PREFIX.sub("", first_line(exc)).strip()
    return ORT_SOURCE_LOCATION.sub("", line).strip() or first_line(exc)


def _check_runtime(source: str | bytes, path: Path) -> None:
    """Open an ONNX Runtime session (CPU, no graph optimisation, one thread) as the check ORT accepts it."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = ORT_LOG_FATAL_ONLY
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    try:
        ort.InferenceSession(source, opts, providers=[CPU])
    except Exception as exc:
        raise OnnxZipError(f"{path}: ONNX Runtime cannot load it ({_ort_reason(exc)})") from None


def external_data_files(path: str | Path) -> list[Path]:
    """The external-data files a model file names, validated as load() validates them (the data is
    not read). Raises OnnxZipError as load does."""
    path = Path(path)
    return sorted({r.file for r in _check_tensors(_read_proto(path), path)})


def runtime_source(path: str | Path) -> str | bytes:
    """What to hand ONNX Runtime to run a model file as onnxzip imports it.

    The path itself when the file runs as it is; the imported model's bytes when import changed
    what ORT would see (external data read in, duplicate node names renamed, unused sparse
    initializers dropped) and the model fits in memory. Raises OnnxZipError as load does (less the
    ONNX Runtime check itself).
    """
    path = Path(path)
    try:
        return _runtime_input(_import(path, check_runtime=False), path)
    except MemoryError:
        raise OnnxZipError(f"{path}: not enough memory to load it") from None


def load(path: str | Path, runtime_ops: bool = False) -> Loaded:
    """Load, check and shape-infer an ONNX model, with its size on disk and external-data files.

    Refused with OnnxZipError naming the file and the tensor or node at fault: a file that is not a
    model, an IR version or opset the installed onnx does not know, a node of a non-ONNX domain, a
    graph without typed tensor inputs and outputs, a used sparse tensor, tensor data of the wrong
    size, external data outside the model's folder or beyond its file, and anything the onnx checker,
    strict shape inference or ONNX Runtime (a CPU session, no graph optimisation) refuses. Node names
    are made unique and unused sparse initializers dropped. Models above IN_MEMORY_LIMIT_BYTES are
    checked and inferred from their path.
    """
    path = Path(path)
    try:
        return _import(path, check_runtime=True, runtime_ops=runtime_ops)
    except MemoryError:
        raise OnnxZipError(f"{path}: not enough memory to load it") from None


def load_model(path: str | Path, runtime_ops: bool = False) -> tuple[onnx.ModelProto, int]:
    """The checked, shape-inferred model of load() and its size on disk in bytes (``runtime_ops``: a model
    that may hold ONNX Runtime's own operators, as its quantizers write them)."""
    loaded = load(path, runtime_ops)
    return loaded.model, loaded.size
