"""MergeOptions: the one options object that both the CLI and the Python API use."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING

import numpy as np

from .errors import OnnxZipError, clip, printable
from .format import LAYOUTS, MULTI

if TYPE_CHECKING:  # the retraining bridge's options; onnxzip.retrain is imported only when used
    from .retrain.options import RetrainOptions

# The choices: how pairs are chosen (cost.py), how they are matched (match.py), where ONNX Runtime
# runs (runtime.py), and the layouts of an image input (calib.py).
COSTS = ("hessian", "l2", "correlation", "random")
SOLVERS = ("optimal", "greedy")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_LAYOUTS = ("NCHW", "NHWC")
RESIZE_DIMS = 2
# The most pixels one image may be resized to (4096 x 4096).
MAX_TARGET_PIXELS = 1 << 24
# Normalization keeps (pixel - mean) / std, pixels in [0, 1], well inside float32.
MAX_ABS_MEAN = 1e6
MIN_ABS_STD = 1e-6
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The command line's help panels, and the metadata key under which a field says how the command
# line offers it (cli_field; the CLI generates its options from these, see onnxzip.cli.fields).
PANEL_SHARING, PANEL_PAIRING, PANEL_DATA, PANEL_CHECKS, PANEL_RUN = (
    "How much to share", "How to pair and merge", "Calibration data", "Output and checks", "Where and how to run")
CLI_KEY = "cli"


@dataclass(frozen=True)
class Flag:
    """How the command line offers an options field: help text, help panel, the flag (default:
    --FIELD-NAME), and the type it parses when that is not the field's own (e.g. str for a size)."""

    help: str
    panel: str
    flag: str | None = None
    parse_as: type | None = None
    choices: tuple[str, ...] | None = None  # the values it takes, shown in --help and checked on parsing


def cli_field(default, help: str, panel: str, flag: str | None = None, parse_as: type | None = None,
              choices: tuple[str, ...] | None = None):
    """A dataclass field with a default that the command line offers as an option."""
    return field(default=default, metadata={CLI_KEY: Flag(help, panel, flag, parse_as, choices)})


# Relative damping of the layer-wise Hessians: lambda = DEFAULT_DAMPING * mean(diag H) (as GPTQ's).
DEFAULT_DAMPING = 1e-2
# Relative ridge of the label-free correction's least squares, towards the current weights.
DEFAULT_CORRECT_DAMPING = 1e-3
DEFAULT_BATCH_SIZE = 64
# Calibration samples per task for the final check that the written model equals the tied one.
DEFAULT_VERIFY_SAMPLES = 512
# Samples per task of --stream-pairing all's first pass (zipper.zip_networks; benchmarks/guide_samples.py).
DEFAULT_GUIDE_SAMPLES = 512
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30}
PARAMS, BYTES = "params", "bytes"
STREAM_PAIRINGS = ("all", "early")
# onnxzip quantize: ONNX Runtime's static (QDQ, calibrated activations) or dynamic int8; samples per task.
QUANT_MODES = ("static", "dynamic")
# How static int8 is written: Q/DQ pairs around float ops, or ONNX Runtime's QLinear* operators.
QUANT_FORMATS = ("qdq", "qoperator")
# Static int8 activation ranges: each tensor's from the samples of the tasks whose output it feeds, or from
# every task's samples.
QUANT_RANGES = ("task", "joint")
DEFAULT_QUANT_SAMPLES = 256


def parse_size(text: str | int) -> tuple[int, str]:
    """A --target-size as (value, unit): '250000' parameters, or '800KB', '1.2MB', '1MiB', '500000B' bytes."""
    if isinstance(text, Integral) and not isinstance(text, bool) and text > 0:
        return int(text), PARAMS
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise OnnxZipError(f"--target-size must be a positive parameter count (250000) or a size in bytes (800KB, "
                           f"1.2MB), got '{text}'")
    number, unit = float(m.group(1)), (m.group(2) or "")
    if not unit:
        return int(number), PARAMS
    return int(number * _SIZE_UNITS[unit[:-1].upper()]), BYTES


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input: size, per-channel normalization and layout."""

    resize: tuple[int, int] | None = None  # (height, width); None: from the model input shape
    mean: tuple[float, ...] = (0.0,)  # per channel (one value broadcasts), on pixels scaled to [0, 1]
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # or "NHWC": the layout of the MODEL input

    def __post_init__(self) -> None:
        if not isinstance(self.layout, str) or self.layout not in IMAGE_LAYOUTS:
            raise _image_error(f"image layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {clip(repr(self.layout))}")
        _check_resize(self.resize)
        mean, std = _real_values(self.mean, "mean"), _real_values(self.std, "std")
        if any(abs(m) > MAX_ABS_MEAN for m in mean) or any(abs(s) < MIN_ABS_STD for s in std):
            raise _image_error(
                f"image mean and std must be finite, |mean| <= {MAX_ABS_MEAN:g} and |std| >= {MIN_ABS_STD:g}, "
                f"got {clip(repr(self.mean))} / {clip(repr(self.std))}"
            )


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _image_error(message: str) -> OnnxZipError:
    return OnnxZipError(printable(message))


def _check_resize(resize: object) -> None:
    """None, or (height, width): two positive integers of at most MAX_TARGET_PIXELS pixels."""
    if resize is None:
        return
    sizes = tuple(resize) if isinstance(resize, (tuple, list)) else ()
    if len(sizes) != RESIZE_DIMS or not all(_is_integer(d) and d >= 1 for d in sizes):
        raise _image_error(f"image resize must be two positive sizes (height, width), got {clip(repr(resize))}")
    if int(sizes[0]) * int(sizes[1]) > MAX_TARGET_PIXELS:
        raise _image_error(f"image resize {sizes[0]}x{sizes[1]} has more than {MAX_TARGET_PIXELS} pixels")


def _real_values(values: object, what: str) -> tuple[float, ...]:
    """A non-empty tuple or list of real numbers, each finite also as a float32."""
    items = tuple(values) if isinstance(values, (tuple, list)) else ()
    if not items or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
        raise _image_error(f"image {what} must be one or more numbers, got {clip(repr(values))}")
    try:
        floats = tuple(float(v) for v in items)
    except OverflowError:
        floats = (math.inf,)
    if not all(math.isfinite(f) and abs(f) <= FLOAT32_MAX for f in floats):
        raise _image_error(f"image {what} must be finite, got {clip(repr(values))}")
    return floats


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: how much to share, how to score and match, how to emit and verify."""

    share: float = cli_field(1.0, "Fraction of each hidden layer's units to share.", PANEL_SHARING)
    share_layers: tuple[tuple[str, float | int], ...] = ()
    max_cost: float | None = cli_field(None, "Share only pairs whose cost is below this.", PANEL_SHARING)
    alpha: float = cli_field(0.5, "Weight of the first task's Hessian (the second gets 1 - alpha).", PANEL_PAIRING)
    # How pairs are chosen: hessian (MTZ), l2 (weight distance), correlation (pre-activations on the
    # same samples), random (seeded by ``seed``); see pairing/. Merged weights are MTZ's for all.
    cost: str = cli_field("hessian", "How to choose pairs: hessian (MTZ's functional difference), l2 (weight "
                          "distance, Git Re-Basin style), correlation (pre-activation correlation, ZipIt style; "
                          "needs one --calib folder) or random (see --seed). Merged weights are MTZ's for all.",
                          PANEL_PAIRING, choices=COSTS)
    solver: str = cli_field("optimal", "Matching: optimal (exactly k, least total cost) or greedy.", PANEL_PAIRING,
                            choices=SOLVERS)
    correct: bool = cli_field(True, "Label-free least-squares correction.", PANEL_PAIRING)
    damping: float = cli_field(DEFAULT_DAMPING, "Relative Hessian damping.", PANEL_PAIRING)
    correct_damping: float = cli_field(DEFAULT_CORRECT_DAMPING, "Relative ridge of the label-free correction, "
                                       "towards the current weights.", PANEL_PAIRING)
    layout: str = MULTI
    tasks: tuple[str, ...] = ()
    calib_samples: int | None = cli_field(None, "Use at most N samples per task.", PANEL_DATA)
    max_patches: int | None = cli_field(None, "Conv Hessians from at most N positions per sample (default: all).",
                                        PANEL_DATA)
    batch_size: int = cli_field(DEFAULT_BATCH_SIZE, "Samples per ONNX Runtime call.", PANEL_DATA)
    image: ImageOptions = field(default_factory=ImageOptions)
    verify_samples: int = cli_field(DEFAULT_VERIFY_SAMPLES, "Calibration samples per task on which the written "
                                    "model is checked against its tied model (at least 1).", PANEL_CHECKS)
    device: str = cli_field("auto", "auto, cpu or cuda (ONNX Runtime execution provider).", PANEL_RUN,
                            choices=DEVICES)
    # Seed of the random pairing of cost "random" (layer k draws from a generator seeded (seed, k)).
    seed: int = cli_field(0, "Seed of --cost random's pairing and of retraining (the same seed, the same result).",
                          PANEL_RUN)
    # Retrain after each zipped layer (MTZ Algorithm 1, line 10) with these options, ``iters``
    # per layer; None: no retraining. Needs PyTorch.
    retrain: "RetrainOptions | None" = None
    # Choose the per-layer shares automatically (budget.py): the most sharing with each task's
    # held-out fidelity dropping at most ``budget`` points, or the best fidelity at ``target_size``
    # (a parameter count, or bytes as '800KB'). Replaces --share and --share-layer.
    budget: float | None = cli_field(None, "Choose per-layer shares: the most sharing with each task's fidelity on "
                                     "held-out calibration samples dropping at most this many points (accuracy "
                                     "where the samples have labels).", PANEL_SHARING)
    target_size: int | str | None = cli_field(None, "Choose per-layer shares for the best fidelity at this size: "
                                              "parameters (250000) or bytes (800KB, 1.2MB).", PANEL_SHARING,
                                              parse_as=str)
    # Per task (name, scale, offset): the model expects x = scale * u + offset of the raw input u
    # the merged model takes; folded into its first layer (canonical.fold_input_affine).
    input_scale: tuple[tuple[str, float, float], ...] = ()
    # How a unit space with writers after its first reader (a residual stream) is paired: "all"
    # from the pair costs of all its writers (a second pass over the layers), "early" from those
    # before its first reader only (one pass; faster). Chains always take one pass.
    # Per task (name, output): the graph output that is the task's, of a model with several (a debug
    # output beside the logits); the others are dropped on import.
    task_outputs: tuple[tuple[str, str], ...] = ()
    # Write the model card and the sharing picture next to the merged model (card.py).
    card: bool = cli_field(True, "Write a model card (NAME.card.md) and a picture of the sharing per layer "
                           "(NAME.sharing.png) next to the merged model.", PANEL_CHECKS)
    # Also write an int8 copy of the merged model (quantize.py, with the merge's --calib folders).
    quantize: str | None = cli_field(None, "Also write an int8 copy next to the merged model (NAME.int8.onnx): static "
                                     "(QDQ, activations calibrated on each task's --calib samples) or dynamic.",
                                     PANEL_CHECKS, choices=QUANT_MODES)
    stream_pairing: str = cli_field("all", "Residual streams: all (paired from the costs of all their writers; two "
                                    "passes) or early (from the writers before the stream is first read; one pass, "
                                    "faster).", PANEL_PAIRING, choices=STREAM_PAIRINGS)
    # The first of --stream-pairing all's two passes only gathers the later writers' statistics that
    # guide a stream's pairing; it reads each task's first ``guide_samples`` calibration samples (0: all).
    guide_samples: int = cli_field(DEFAULT_GUIDE_SAMPLES, "Calibration samples per task of --stream-pairing "
                                          "all's first pass, which only guides the streams' pairing (0: all).",
                                          PANEL_PAIRING)

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.share <= 1.0, f"--share must lie in [0, 1], got {self.share}"),
            (0.0 < self.alpha < 1.0, f"--alpha must lie strictly between 0 and 1, got {self.alpha}"),
            (self.cost in COSTS, f"--cost must be one of {', '.join(COSTS)}, got '{self.cost}'"),
            (self.solver in SOLVERS, f"--solver must be one of {', '.join(SOLVERS)}, got '{self.solver}'"),
            (self.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got '{self.device}'"),
            (self.damping > 0 and self.correct_damping > 0, "damping factors must be positive"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (isinstance(self.verify_samples, Integral) and not isinstance(self.verify_samples, bool)
             and self.verify_samples >= 1,
             f"--verify-samples must be at least 1 (the written model is always checked), got {self.verify_samples!r}"),
            (self.calib_samples is None or self.calib_samples >= 1,
             f"--calib-samples must be at least 1, got {self.calib_samples}"),
            (self.max_cost is None or self.max_cost > 0, f"--max-cost must be positive, got {self.max_cost}"),
            (isinstance(self.seed, Integral) and not isinstance(self.seed, bool) and self.seed >= 0,
             f"--seed must be a non-negative integer, got {self.seed!r}"),
            (self.retrain is None or (hasattr(self.retrain, "iters") and hasattr(self.retrain, "lr")),
             f"retrain must be a RetrainOptions or None, got {type(self.retrain).__name__}"),
            (self.guide_samples >= 0,
             f"--guide-samples must be at least 0 (0: all), got {self.guide_samples}"),
            (self.stream_pairing in STREAM_PAIRINGS,
             f"--stream-pairing must be one of {', '.join(STREAM_PAIRINGS)}, got '{self.stream_pairing}'"),
            (self.max_patches is None or self.max_patches >= 1,
             f"--max-patches must be at least 1, got {self.max_patches}"),
            (self.quantize is None or self.quantize in QUANT_MODES,
             f"--quantize must be one of {', '.join(QUANT_MODES)}, got '{self.quantize}'"),
        ]
        checks += [
            (self.budget is None or self.budget >= 0, f"--budget must be at least 0 points, got {self.budget}"),
            (self.budget is None or self.target_size is None, "give --budget or --target-size, not both"),
            ((self.budget is None and self.target_size is None) or not self.share_layers,
             "--share-layer sets shares by hand; --budget and --target-size choose them"),
        ]
        for ok, message in checks:
            if not ok:
                raise OnnxZipError(message)
        if self.target_size is not None:
            parse_size(self.target_size)
        for name, value in self.share_layers:
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise OnnxZipError(f"--share-layer {name}={value}: a fraction must lie in [0, 1]")
            if isinstance(value, int) and value < 0:
                raise OnnxZipError(f"--share-layer {name}={value}: a count must not be negative")

    def task_scales(self, n_tasks: int) -> tuple[float, ...]:
        """Weight of each task's Hessian: (alpha, 1 - alpha) for two tasks, 1/n each for more."""
        if n_tasks == 2:
            return (self.alpha, 1.0 - self.alpha)
        if self.alpha != 0.5:
            raise OnnxZipError(f"--alpha balances two tasks; {n_tasks} models weigh their tasks equally")
        return (1.0 / n_tasks,) * n_tasks

    def shared_count(self, layer: str, widths: tuple[int, ...]) -> int:
        """How many units of this layer to share, from --share-layer or --share."""
        value = dict(self.share_layers).get(layer, self.share)
        most = min(widths)
        if isinstance(value, int) and not isinstance(value, bool):
            if value > most:
                raise OnnxZipError(f"--share-layer {layer}={value}: the layer has only {most} units to share")
            return value
        return int(round(value * most))
