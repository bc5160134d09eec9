"""int8 quantization of a merged model through ONNX Runtime's quantizers, for both layouts (DESIGN.md
section 7).

ONNX Runtime's quantizers do not look into If branches: on the gated layout, static QDQ rewrote
main-graph tensors that the branches read (the MobileNetV2 pair lost 17 and 10 points), QOperator
failed, dynamic quantized the trunk only. So a gated model is inlined into the multi layout first
(gating.ungate: one output per task, the same nodes), quantized there, and gated again
(gating.gate), which places the quantized nodes, Q/DQ pairs included, by the tasks they serve.

Static quantization calibrates on each task's own samples (each task's folder, in the merged model's
input form), task by task: a tensor's activation range joins the ranges of the tasks whose output it
feeds, so a task's own tensors see its own samples only. Each task's top-1 agreement with the float merged model is
measured on its calibration samples (and, with ``evals``, the accuracy of both); every shared
block stays one initializer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from . import __version__
from .calib import iter_batches, load_labeled
from .errors import OnnxZipError
from .format import GATED, KEY_QUANTIZED, TASK_INPUT, meta_key
from .gating import gate, tensor_tasks, ungate
from .guard import Output, Read, check_outputs
from .ir import TensorSpec
from .load import load_model
from .merged import read_meta
from .options import DEFAULT_QUANT_SAMPLES, QUANT_FORMATS, QUANT_MODES, QUANT_RANGES
from .runtime import resolve_device
from .save import save_atomically
from .scratch import scratch_dir
from .shapes import infer_edge_shapes
from .tasks import per_task, some_tasks
from .verify import MergedRunner
from .progress import UNIT_STEPS, UNIT_TASKS, ProgressFn, no_progress

STATIC, DYNAMIC = QUANT_MODES
QDQ, QOPERATOR = QUANT_FORMATS
TASK_RANGES = QUANT_RANGES[0]
DEFAULT_BATCH_SIZE = 32
# Initializers of at least this many elements are weights; two with equal bytes are one block stored twice.
WEIGHT_MIN_ELEMENTS = 64
# The suffixes ONNX Runtime's quantizers append to the names they make, and the short ones written instead
# (longest first: a suffix may end another).
QUANT_SUFFIXES = (("_DequantizeLinear_Output", ".dq"), ("_QuantizeLinear_Output", ".q"),
                  ("_QuantizeLinear_Input", ".qin"), ("_quantized_scale", ".qscale"),
                  ("_quantized_zero_point", ".qzero"), ("_quantized", ".int8"), ("_zero_point", ".zero"),
                  ("_scale", ".scale"), ("_DequantizeLinear", ".DQ"), ("_QuantizeLinear", ".Q"),
                  ("_quant", ".int8"))


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize: static (calibrated activations, as QDQ pairs or QLinear operators) or dynamic int8;
    samples per task."""

    mode: str = STATIC
    format: str = QDQ
    ranges: str = TASK_RANGES
    samples: int = DEFAULT_QUANT_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE
    per_channel: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise OnnxZipError(f"--mode must be one of {', '.join(QUANT_MODES)}, got '{self.mode}'")
        if self.format not in QUANT_FORMATS:
            raise OnnxZipError(f"--format must be one of {', '.join(QUANT_FORMATS)}, got '{self.format}'")
        if self.ranges not in QUANT_RANGES:
            raise OnnxZipError(f"--ranges must be one of {', '.join(QUANT_RANGES)}, got '{self.ranges}'")
        if self.mode == DYNAMIC and self.format != QDQ:
            raise OnnxZipError("--format is for --mode static: dynamic int8 is always written as ONNX Runtime's "
                               "integer operators")
        for name, value in (("--samples", self.samples), ("--batch-size", self.batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OnnxZipError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TaskQuantized:
    """One task of the quantized model: top-1 agreement with the float model on its calibration samples,
    and accuracy of both on its --eval samples (None without)."""

    task: str
    samples: int
    agreement: float
    accuracy_float: float | None = None
    accuracy_int8: float | None = None


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization wrote and measured."""

    output: str
    mode: str
    format: str
    layout: str
    tasks: tuple[TaskQuantized, ...]
    bytes_float: int
    bytes_int8: int
    seconds: float


def _samples(folder: Path, spec: TensorSpec, opts: QuantizeOptions) -> np.ndarray:
    x = np.concatenate(list(iter_batches(folder, spec, opts.batch_size, opts.samples)))
    if not np.isfinite(x).all():
        raise OnnxZipError(f"{folder}: calibration samples hold non-finite values")
    return x


class _Reader:
    """ONNX Runtime's calibration data reader over every task's samples, in batches of the merged input."""

    def __init__(self, name: str, samples: Sequence[np.ndarray], batch_size: int):
        self.batches: Iterator[dict] = iter([{name: x[i:i + batch_size]} for x in samples
                                             for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _gemms_as_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Gemm (x W^T + b) as MatMul by one transposed copy of W, then Add, in place.

    ONNX Runtime's dynamic quantizer rewrites each Gemm into a MatMul itself and transposes the weight
    once per Gemm, so a shared block read by two Gemms (one per task in the multi layout) came out
    transposed twice, and the model did not load. Here each weight is transposed once, for all its readers.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes, transposed = [], {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        w = node.input[1]
        if attrs.get("transB", 0) and w not in transposed:
            transposed[w] = onnx.numpy_helper.from_array(
                np.ascontiguousarray(onnx.numpy_helper.to_array(inits[w]).T), f"{w}.T")
        weight = transposed[w].name if attrs.get("transB", 0) else w
        product = f"{node.output[0]}.MatMul" if len(node.input) > 2 else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.MatMul"))
        if len(node.input) > 2:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(transposed.values())
    still_read = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in still_read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _task_ranges(src: Path, multi: onnx.ModelProto, name: str, samples: Sequence[np.ndarray],
                 opts: QuantizeOptions, tmp: Path, progress: ProgressFn) -> Path:
    """Activation ranges calibrated per task, written as ONNX Runtime's calibration cache.

    ONNX Runtime calibrates each task's samples apart (MinMax); with ``ranges`` task a tensor's range
    joins the ranges of the tasks whose output it feeds, so a task's own tensors see only its own samples
    and the tensors of the common trunk see every task's; with joint every tensor's joins all tasks'.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData, create_calibrator,
                                                    save_tensors_data)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    reader = type("Reader", (_Reader, CalibrationDataReader), {})
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates, no more
    per_task, tick = [], progress("int8 ranges", len(samples), UNIT_TASKS)
    for t, x in enumerate(samples):
        calibrator = create_calibrator(src, ops, augmented_model_path=str(tmp / f"augmented.{t}.onnx"))
        calibrator.collect_data(reader(name, [x], opts.batch_size))
        per_task.append(calibrator.compute_data().data)
        del calibrator
        tick()
    users = tensor_tasks(multi) if opts.ranges == TASK_RANGES else {}
    every = frozenset(range(len(samples)))
    joined = {}
    for tensor in per_task[0]:
        ranges = [per_task[t][tensor] for t in sorted(users.get(tensor) or every)]
        joined[tensor] = TensorData(lowest=np.minimum.reduce([r.lowest for r in ranges]),
                                    highest=np.maximum.reduce([r.highest for r in ranges]))
    cache = tmp / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, joined), cache)
    return cache


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizers log advice on the root logger (pre-processing, which onnxzip's own shape
    inference covers; QOperator being slower on x64, which --help says): hold it back while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantized_multi(multi: onnx.ModelProto, name: str, samples: Sequence[np.ndarray], opts: QuantizeOptions,
                     tmp: Path, progress: ProgressFn) -> onnx.ModelProto:
    """The multi-layout model quantized by ONNX Runtime (static, as QDQ or QLinear operators, or dynamic int8)."""
    src, dst = tmp / "multi.onnx", tmp / "multi.int8.onnx"
    if opts.mode == DYNAMIC:
        copy = onnx.ModelProto()
        copy.CopyFrom(multi)
        multi = _gemms_as_matmuls(copy)
    onnx.save_model(multi, str(src))
    with _quiet_quantizer():
        cache = _task_ranges(src, multi, name, samples, opts, tmp, progress) if opts.mode == STATIC else None
        tick = progress("int8 weights", 1, UNIT_STEPS)
        _run_quantizer(src, dst, cache, opts)
        tick()
    return onnx.load_model(str(dst))


def _run_quantizer(src: Path, dst: Path, ranges: Path | None, opts: QuantizeOptions) -> None:
    """ONNX Runtime's static (with the activation ranges of ``ranges``) or dynamic quantizer, ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    if opts.mode == STATIC:
        form = QuantFormat.QDQ if opts.format == QDQ else QuantFormat.QOperator
        quantize_static(str(src), str(dst), quant_format=form, per_channel=opts.per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibration_cache_path=ranges)
    else:
        # every tensor of a merged model is float32; the quantizer needs that for the MatMul it writes for a Gemm
        quantize_dynamic(str(src), str(dst), per_channel=opts.per_channel, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _short(name: str) -> str:
    for long, short in QUANT_SUFFIXES:
        if name.endswith(long):
            return name[:-len(long)] + short
    return name


def _compact(q: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized model with one initializer per distinct scalar (the quantizer writes a zero point and a
    scale per tensor, mostly equal ones) and its suffixes shortened, in place: the same computation in fewer
    bytes (the MobileNetV2 pair's static file: 460 to 383 kB). Graph inputs and outputs keep their names."""
    g = q.graph
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in g.initializer:
        if int(np.prod(t.dims)) == 1:
            key = (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes())
            if key in first:
                alias[t.name] = first[key]
                continue
            first[key] = t.name
        kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    fixed = {v.name for v in (*g.input, *g.output)}
    names = {x for n in g.node for x in (*n.input, *n.output)} | {t.name for t in kept}
    renamed = {x: _short(x) for x in names - fixed if _short(x) != x}
    if len(set(renamed.values())) < len(renamed) or set(renamed.values()) & (names - set(renamed)):
        renamed = {}  # a short name would be taken twice: keep the quantizer's names
    rename = lambda x: renamed.get(alias.get(x, x), alias.get(x, x))  # noqa: E731
    for n in g.node:
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
        n.name = _short(n.name)
    for t in g.initializer:
        t.name = rename(t.name)
    for v in g.value_info:
        v.name = rename(v.name)
    return q


def _stored_twice(model: onnx.ModelProto) -> list[str]:
    """Weights whose bytes another initializer holds too (a block stored twice)."""
    seen: dict[bytes, str] = {}
    twice = []
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) < WEIGHT_MIN_ELEMENTS:
            continue
        key = hashlib.sha256(t.SerializeToString(deterministic=True).replace(t.name.encode(), b"")).digest()
        if key in seen:
            twice.append(f"{seen[key]} and {t.name}")
        seen.setdefault(key, t.name)
    return twice


def quantized_label(opts: QuantizeOptions) -> str:
    """How a model was quantized, as its metadata says."""
    return f"int8 {opts.mode}{', QLinear operators' if opts.format == QOPERATOR else ''} (ONNX Runtime)"


def _finish(q: onnx.ModelProto, model: onnx.ModelProto, opts: QuantizeOptions) -> onnx.ModelProto:
    """The quantized model with the merged one's metadata, description and producer, and how it was made."""
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    q.metadata_props.add(key=meta_key(KEY_QUANTIZED), value=quantized_label(opts))
    q.doc_string, q.producer_name, q.producer_version = model.doc_string, model.producer_name, __version__
    return infer_edge_shapes(q)


def _measure(before: MergedRunner, after: MergedRunner, t: int, task: str, x: np.ndarray,
             labelled: tuple[np.ndarray, np.ndarray] | None, batch: int) -> TaskQuantized:
    def top1(run: MergedRunner, data: np.ndarray) -> np.ndarray:
        return np.concatenate([run(t, data[i:i + batch]).argmax(1) for i in range(0, len(data), batch)])
    agreement = float((top1(before, x) == top1(after, x)).mean())
    if labelled is None:
        return TaskQuantized(task, len(x), agreement)
    xe, labels = labelled
    return TaskQuantized(task, len(x), agreement, float((top1(before, xe) == labels).mean()),
                         float((top1(after, xe) == labels).mean()))


def quantize(merged: str | Path, calib: str | Path | Mapping[str, str | Path], output: str | Path,
             opts: QuantizeOptions = QuantizeOptions(),
             evals: Mapping[str, str | Path] | None = None, progress: ProgressFn = no_progress) -> QuantizeResult:
    """Quantize a merged model (either layout) to int8 at ``output``, keeping its layout and metadata.

    ``calib`` is one folder for every task or a {task: folder} mapping of samples in the merged model's
    input form; ``evals`` maps tasks to labelled folders for accuracy before and after; ``progress``
    reports each stage (ranges per task, the quantizer, the check per task). Raises
    OnnxZipError on what a user can cause (then nothing is written).
    """
    start = time.perf_counter()
    merged, output = Path(merged), Path(output)
    model, _ = load_model(merged, runtime_ops=True)
    meta = read_meta(model, merged)
    if KEY_QUANTIZED in meta.raw:
        raise OnnxZipError(f"{merged}: already quantized ({meta.raw[KEY_QUANTIZED]}); quantize the float merged model")
    folders = per_task(calib, meta.tasks, "--calib")
    eval_dirs = some_tasks(evals, meta.tasks, "--eval")
    check_outputs([Output(output, "-o")], [Read(merged, "merged model")] +
                  [Read(f, "--calib data") for f in folders] + [Read(f, "--eval data") for f in eval_dirs.values()])
    graph_input = next(i for i in model.graph.input if i.name != TASK_INPUT)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim)
    spec = TensorSpec(graph_input.name, dims, np.dtype(np.float32))
    samples = [_samples(f, spec, opts) for f in folders]
    try:
        multi = ungate(model, meta.tasks) if meta.layout == GATED else model
    except ValueError as exc:
        raise OnnxZipError(f"{merged}: not a gated model as onnxzip writes it: {exc}") from None
    with scratch_dir() as tmp:
        q = _quantized_multi(multi, spec.name, samples, opts, tmp, progress)
    q = _compact(q)
    q = _finish(gate(q, meta.tasks) if meta.layout == GATED else q, model, opts)
    twice = _stored_twice(q)
    if twice:
        raise RuntimeError(f"internal error: the quantized model stores a block twice ({twice[0]})")
    written = save_atomically(q, output, lambda p: onnx.checker.check_model(str(p), full_check=True))
    providers = resolve_device(opts.device)[0]
    before, after = (MergedRunner(p, meta.tasks, meta.layout, providers) for p in (merged, output))
    tick, tasks = progress("int8 check", len(meta.tasks), UNIT_TASKS), []
    for t, (name, x) in enumerate(zip(meta.tasks, samples)):
        tasks.append(_measure(before, after, t, name, x,
                              load_labeled(eval_dirs[name], spec) if name in eval_dirs else None, opts.batch_size))
        tick()
    return QuantizeResult(str(output), opts.mode, opts.format, meta.layout, tuple(tasks), merged.stat().st_size,
                          sum(f.stat().st_size for f in written), time.perf_counter() - start)
