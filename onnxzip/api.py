"""The Python API: merge() runs load -> align -> zip -> emit -> verify and writes the file atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import __version__, skeleton
from .align import Alignment, align
from .budget import (SearchReport, layer_counts, merged_params, params_saved, search, separate_samples,
                     split_samples)
from .calib import count_samples, iter_batches, load_labeled
from .card import card_path, picture_path, render, write_picture
from .canonical import fold_input_affine, import_network
from .emit import merged_model
from .errors import OnnxZipError
from .format import (KEY_LAYOUT, KEY_NETWORKS, KEY_PLAN, KEY_SHARING, KEY_SOURCES, KEY_TASKS, KEY_VERSION, MULTI, meta_key,
                     weight_params)
from .guard import Output, Read, check_outputs
from .inputs import expected, feeder, input_words, same_form
from .ir import Network
from .options import PARAMS, MergeOptions, parse_size
from .pairing import method, methods
from .quantize import QuantizeOptions, QuantizeResult, quantize
from .plan import LayerPlan, SharingPlan
from .runtime import resolve_device
from .save import save_atomically, write_text_atomically
from .spaces import unit_spaces
from .tasks import check_known, per_task, some_tasks, task_names
from .verify import MergedRunner, TaskCheck, accuracies, check_task
from .progress import UNIT_MODELS, UNIT_STEPS, UNIT_TASKS, ProgressFn, no_progress
from .zipper import StageTimer, zip_networks


@dataclass(frozen=True)
class LayerReport:
    """One row of the merge table; ``note`` says what did not run as asked (e.g. a correction skipped
    for lack of memory), "" when everything did."""

    name: str
    units: tuple[int, ...]
    shared: int
    params_saved: int
    cost: float
    rel_error: tuple[float, ...]
    note: str = ""


@dataclass(frozen=True)
class MergeResult:
    """What a merge did and measured."""

    output: str
    plan: SharingPlan
    layers: tuple[LayerReport, ...]
    checks: tuple[TaskCheck, ...]
    params_inputs: tuple[int, ...]
    params_merged: int
    bytes_inputs: tuple[int, ...]
    bytes_merged: int
    seconds: dict
    device: str
    # One entry per retraining round of --retrain-iters (onnxzip.retrain.schedule.LayerRetrain).
    retraining: tuple = ()
    # What --budget or --target-size searched and chose (budget.SearchReport), else None.
    search: SearchReport | None = None
    # Per task, one line on what the merged input feeds it (inputs.input_words).
    inputs: tuple[str, ...] = ()
    # Why the layers after the aligned ones are each task's own (align.Alignment.stop), or ''.
    alignment: str = ""
    # The int8 copy that --quantize wrote and what it measured (quantize.QuantizeResult), else None.
    quantized: QuantizeResult | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict: the plan and every figure."""
        out = asdict(self)
        out["plan"] = json.loads(self.plan.to_json())
        return out


# Version of the --report document's layout; raised when a key changes meaning or goes away.
REPORT_SCHEMA = 1


def _layer_reports(plan: SharingPlan, net: Network) -> tuple[LayerReport, ...]:
    """Per layer: shared units and parameters saved (a shared block is stored once, not once per task)."""
    depth = len(net.layers)  # the plan may go deeper (another task's own layers): those save nothing
    once = params_saved(net, [lp.n_shared for lp in plan.layers[:depth]], 2)  # one copy saved per block
    saved = [s * (len(lp.members) - 1) for s, lp in zip(once, plan.layers)] + [0] * (len(plan.layers) - depth)
    return tuple(LayerReport(lp.name, lp.units, lp.n_shared, s, lp.cost, lp.rel_error, lp.note)
                 for lp, s in zip(plan.layers, saved))


def _sources(tasks: Sequence[str], nets: Sequence[Network], opts: MergeOptions) -> dict[str, dict]:
    """Per task, its model: file name, SHA-256, parameters, bytes, output and the input it expects."""
    scales = {t: [s, o] for t, s, o in opts.input_scale}
    return {t: {"file": Path(n.path).name, "sha256": n.sha256, "params": n.params, "bytes": n.file_bytes,
                "output": n.output.name, "input": e.to_json(), **({"input_scale": scales[t]} if t in scales else {})}
            for t, n, e in zip(tasks, nets, expected(nets))}


def _metadata(plan: SharingPlan, nets: Sequence[Network], opts: MergeOptions) -> dict[str, str]:
    sources = _sources(plan.tasks, nets, opts)
    sharing = "; ".join(f"{l.name}: {l.n_shared}/{'x'.join(map(str, l.units))}" for l in plan.layers)
    return {meta_key(KEY_VERSION): __version__, meta_key(KEY_TASKS): json.dumps(list(plan.tasks)),
            meta_key(KEY_SOURCES): json.dumps(sources), meta_key(KEY_LAYOUT): opts.layout,
            meta_key(KEY_SHARING): sharing, meta_key(KEY_PLAN): plan.to_json(),
            meta_key(KEY_NETWORKS): skeleton.pack({t: skeleton.to_json(n) for t, n in zip(plan.tasks, nets)})}


def _streams(folders: Sequence[Path], nets: Sequence[Network], opts: MergeOptions):
    streams, counts = [], []
    for folder, net in zip(folders, nets):
        n = count_samples(folder, net.input, opts.calib_samples, opts.image)
        streams.append(partial(iter_batches, folder, net.input, opts.batch_size, opts.calib_samples, opts.image))
        counts.append(-(-n // opts.batch_size))
    return streams, counts


def merge(models: Sequence[str | Path], calib: str | Path | Mapping[str, str | Path], output: str | Path,
          options: MergeOptions = MergeOptions(), evals: Mapping[str, str | Path] | None = None,
          progress: ProgressFn = no_progress, timer: StageTimer | None = None,
          retrain_data: str | Path | Mapping[str, str | Path] | None = None,
          budget_data: str | Path | Mapping[str, str | Path] | None = None,
          report: str | Path | None = None, command: Sequence[str] | None = None) -> MergeResult:
    """Zip the models into one multi-task ONNX model at ``output`` and return what was measured.

    ``calib`` is one folder for every task or a {task: folder} mapping; ``evals`` optionally maps
    tasks to folders of labelled .npz files for an accuracy report; ``timer`` collects seconds per
    stage. With ``options.retrain`` the model is retrained after each zipped layer on
    ``retrain_data`` (same forms as ``calib``; default: the calibration folders). With
    ``options.budget`` or ``options.target_size``, ``budget_data`` (same forms) holds the samples
    that measure each probe's fidelity; by default the last part of the calibration samples.
    ``report`` is a JSON file for the plan and every figure (report_json; ``command``, the command
    line that ran the merge, is recorded in it). Before any work,
    the outputs are checked to be writable and to be none of the files the merge reads. Raises
    OnnxZipError on any problem a user can cause; then no output file is written.
    """
    timer = timer or StageTimer()
    paths, output = [Path(m) for m in models], Path(output)
    outputs = [Output(output, "-o")] + ([Output(Path(report), "--report", model=False)] if report else [])
    outputs += [Output(quantized_path(output), "--quantize")] if options.quantize else []
    outputs += [Output(card_path(output), "--card", model=False), Output(picture_path(output), "--card", model=False)] \
        if options.card and output.name else []
    tasks = task_names(paths, options.tasks)
    opts = replace(options, tasks=tasks)
    folders = per_task(calib, tasks, "--calib")
    eval_dirs = some_tasks(evals, tasks, "--eval")
    retrain_dirs = None if retrain_data is None else per_task(retrain_data, tasks, "--retrain-data")
    measure_dirs = None if budget_data is None else per_task(budget_data, tasks, "--budget-data")
    data = {"--calib": folders, "--eval": list(eval_dirs.values()), "--retrain-data": retrain_dirs or [],
            "--budget-data": measure_dirs or []}
    check_outputs(outputs, _reads(paths, [], data))
    _check_method_on_tasks(opts, tasks, folders)
    if opts.retrain is None and retrain_data is not None:
        raise OnnxZipError("--retrain-data is given but no retraining is asked for (--retrain-iters)")
    if opts.budget is None and opts.target_size is None and budget_data is not None:
        raise OnnxZipError("--budget-data is given but no share search is asked for (--budget or --target-size)")
    tick = progress("load", len(paths), UNIT_MODELS)
    with timer("load"):
        nets = []
        task_outputs = dict(opts.task_outputs)
        check_known("--task-output", task_outputs, tasks)
        for p, task in zip(paths, tasks):
            nets.append(import_network(p, task_outputs.get(task)))
            tick()
        check_outputs(outputs, _reads(paths, nets, data))  # now with the models' external-data files
        nets = _rescale(nets, opts)
        alignment = align(nets)
        _check_retrain_inputs(opts, nets)
        _check_partial_alignment(opts, nets, alignment)
        _check_layer_names(opts, nets[0], alignment.depth)
        _check_classifiers(opts, nets, evals)
        _check_quantize_inputs(opts, nets, tasks)
        labelled = {tasks.index(t): load_labeled(d, nets[tasks.index(t)].input, classes=nets[tasks.index(t)].classes)
                    for t, d in eval_dirs.items()}
        streams, counts = _streams(folders, nets, opts)
    providers, device = resolve_device(opts.device)
    search_report = None
    if opts.budget is not None or opts.target_size is not None:
        tick = progress("search shares", 1, UNIT_STEPS)
        with timer("search"):
            opts, streams, counts, search_report = _search_shares(nets, folders, opts, providers, measure_dirs)
        tick()
    hook = _retrainer(nets, folders if retrain_dirs is None else retrain_dirs,
                      opts, progress)
    plan, tied = zip_networks(nets, streams, counts, opts, providers, progress, timer, hook, alignment.depths)
    tick = progress("emit", 1, UNIT_STEPS)
    with timer("emit"):
        model = merged_model(plan, tied, opts.layout, _metadata(plan, nets, opts))
    tick()
    checks: list[TaskCheck] = []

    def verify(path: Path) -> None:
        tick = progress("verify", len(tasks), UNIT_TASKS)
        with timer("verify"):
            runner = MergedRunner(path, tasks, opts.layout, providers, [feeder(nets[0], n) for n in nets])
            for t in range(len(tasks)):
                check = check_task(runner, t, tied[t], nets[t], streams[t](), opts.verify_samples, providers)
                if t in labelled:
                    acc_o, acc_m = accuracies(runner, t, nets[t], *labelled[t], opts.batch_size, providers)
                    check = replace(check, accuracy_original=acc_o, accuracy_merged=acc_m)
                checks.append(check)
                tick()

    params = weight_params(model)
    written = save_atomically(model, output, verify)
    result = MergeResult(str(output), plan, _layer_reports(plan, nets[0]), tuple(checks),
                         tuple(n.params for n in nets), params, tuple(n.file_bytes for n in nets),
                         sum(f.stat().st_size for f in written), dict(timer.seconds), device, tuple(hook.rounds) if hook else (),
                         search_report, input_words(nets, tasks, {t for t, _, _ in opts.input_scale},
                                                    len({f.resolve() for f in folders}) > 1),
                         _alignment_words(alignment, nets, tasks))
    if opts.quantize:
        with timer("quantize"):
            try:
                q = quantize(output, dict(zip(tasks, folders)), quantized_path(output),
                             QuantizeOptions(mode=opts.quantize, device=opts.device), eval_dirs, progress)
            except OnnxZipError:  # all or nothing: no merged model without the int8 copy asked for
                output.unlink(missing_ok=True)
                raise
        result = replace(result, quantized=q, seconds=dict(timer.seconds))
    document = report_json(result, _sources(tasks, nets, opts), opts, command)
    if report is not None:
        _write_report(document, Path(report), output)
    if opts.card:
        _write_card(document, plan, output)
    return result


def _write_card(document: dict, plan: SharingPlan, output: Path) -> None:
    """The model card and the sharing picture beside the merged model (card.py), all or nothing: if they cannot
    be written, neither is the merged model."""
    try:
        write_picture(plan, picture_path(output))
        write_text_atomically(render(document, picture_path(output).name), card_path(output))
    except OnnxZipError:
        for path in (output, picture_path(output)):
            path.unlink(missing_ok=True)
        raise


def quantized_path(output: Path) -> Path:
    """Where --quantize writes the int8 copy of a merged model: beside it, NAME.int8.onnx."""
    return output.with_name(f"{output.stem}.int8{output.suffix or '.onnx'}")


def _check_quantize_inputs(opts: MergeOptions, nets: Sequence[Network], tasks: Sequence[str]) -> None:
    """--quantize calibrates on the --calib folders as the merged model reads them: every model must read its
    input in one form (else onnxzip quantize, with samples in the merged input form)."""
    if opts.quantize and not same_form(nets):
        other = next(t for t, n in zip(tasks, nets) if not same_form([nets[0], n]))
        raise OnnxZipError(f"--quantize calibrates on each task's --calib samples, but task '{other}' reads its input "
                           f"in another form than the merged model ({Path(nets[0].path).name}'s); merge without it, "
                           "then run onnxzip quantize with samples in the merged model's input form")


def _reads(paths: Sequence[Path], nets: Sequence[Network], data: Mapping[str, Sequence[Path]]) -> list[Read]:
    """Everything a merge reads: the models, their external-data files and every data folder."""
    reads = [Read(p, "input model") for p in paths]
    reads += [Read(f, f"external data of {Path(n.path).name}") for n in nets for f in n.data_files]
    reads += [Read(folder, f"{flag} data") for flag, folders in data.items() for folder in folders]
    return reads


def report_json(result: MergeResult, sources: Mapping[str, dict], opts: MergeOptions,
                command: Sequence[str] | None) -> dict:
    """The --report document (README, "The report"): its schema version, the onnxzip version, the
    command line and options, each input model with its SHA-256 and expected input, then every figure
    of the result (plan, layers, checks, sizes, seconds)."""
    return {"schema": REPORT_SCHEMA, "onnxzip": __version__, "command": list(command) if command else None,
            "options": asdict(opts), "models": dict(sources), **result.to_json()}


def _write_report(document: dict, report: Path, output: Path) -> None:
    """The JSON report, all or nothing; if it cannot be written the merged model is removed too."""
    try:
        write_text_atomically(json.dumps(document, indent=2), report)
    except OnnxZipError:
        output.unlink(missing_ok=True)
        raise


def _check_classifiers(opts: MergeOptions, nets: Sequence[Network], evals) -> None:
    """Top-1 figures (--eval accuracy, --budget and --target-size fidelity) need classifier outputs."""
    asks = [flag for flag, given in (("--eval", evals), ("--budget", opts.budget is not None),
                                     ("--target-size", opts.target_size is not None)) if given]
    for task, net in zip(opts.tasks, nets):
        if asks and net.classes is None:
            raise OnnxZipError(f"{net.path}: {asks[0]} measures top-1 classes, but task '{task}' outputs "
                               f"{net.output.name} of shape {tuple(net.output.shape)}, not [N, classes]")


# Stand-ins for a pair's cost and relative errors when sizing a plan before its pairs are known:
# the longest repr a float takes, so that the estimated metadata is never shorter than the real one.
_LONGEST_FLOAT = -1.2345678901234567e-300


def _size_plan(nets: Sequence[Network], opts: MergeOptions, counts: tuple[int, ...]) -> SharingPlan:
    """A plan with these counts per free space whose unit indices are the largest (longest in the metadata)."""
    layers, per_layer = [], layer_counts(nets[0], counts)
    for k, l in enumerate(nets[0].layers):
        units = tuple(n.layers[k].out_units for n in nets)
        n = per_layer[k]
        shared = tuple(tuple(u - 1 - i for u in units) for i in range(n))
        layers.append(LayerPlan(l.name, l.kind, units, shared, _LONGEST_FLOAT, (_LONGEST_FLOAT,) * len(nets), True))
    return SharingPlan(opts.tasks, tuple(layers))


def _size_target(nets: Sequence[Network], opts: MergeOptions):
    """--target-size as (value, unit, size of per-layer counts): parameters, or bytes of the emitted file."""
    if opts.target_size is None:
        return None
    value, unit = parse_size(opts.target_size)
    if unit == PARAMS:
        return value, unit, partial(merged_params, nets)

    zeros = [_zeroed(n) for n in nets]  # any plan ties zero blocks; the stored bytes are the same

    def file_bytes(counts: tuple[int, ...]) -> int:
        plan = _size_plan(nets, opts, counts)
        return merged_model(plan, zeros, opts.layout, _metadata(plan, nets, opts)).ByteSize()
    return value, unit, file_bytes


def _zeroed(net: Network) -> Network:
    """The network with every weight and bias set to zero (for sizing a merged file)."""
    for k, layer in enumerate(net.layers):
        net = net.with_layer(k, layer.with_matrix(np.zeros_like(layer.matrix()), np.zeros_like(layer.b)))
    return net


def _search_shares(nets: Sequence[Network], folders: Sequence[Path], opts: MergeOptions, providers: list[str],
                   measure: Sequence[Path] | None = None):
    """Hold out part of each task's calibration samples (or measure on ``measure``, all of each
    folder), search the shares, and fix them as per-layer counts.

    Returns the options to zip with, the calibrating streams and their batch counts, and the report.
    """
    sizes = [count_samples(f, n.input, opts.calib_samples, opts.image) for f, n in zip(folders, nets)]
    if measure is None:
        splits = [split_samples(size, f) for size, f in zip(sizes, folders)]
    else:
        splits = [separate_samples(size, m, count_samples(m, n.input, None, opts.image))
                  for size, m, n in zip(sizes, measure, nets)]
    streams = [partial(iter_batches, f, n.input, opts.batch_size, s.calibrate, opts.image)
               for f, n, s in zip(folders, nets, splits)]
    counts = [-(-s.calibrate // opts.batch_size) for s in splits]
    report = search(nets, folders, splits, streams, counts, opts, providers, _size_target(nets, opts))
    chosen = replace(opts, budget=None, target_size=None, share_layers=tuple(zip(report.layers, report.chosen.counts)))
    return chosen, streams, counts, report


def _retrainer(nets: Sequence[Network], folders: Sequence[Path], opts: MergeOptions, progress: ProgressFn):
    """The after-layer retraining hook of --retrain-iters, or None without retraining."""
    if opts.retrain is None:
        return None
    from .retrain.backend import MERGE_TORCH_HINT, require_torch
    from .retrain.schedule import LayerRetrainer
    require_torch(MERGE_TORCH_HINT)
    meta = partial(_metadata, nets=nets, opts=replace(opts, layout=MULTI))
    return LayerRetrainer(nets, folders, opts.retrain, meta, progress)


def _rescale(nets: list[Network], opts: MergeOptions) -> list[Network]:
    """Each --input-scale task's network on raw inputs (its scaling folded into its first layer)."""
    scales = {}
    check_known("--input-scale", [t for t, _, _ in opts.input_scale], opts.tasks)
    for task, scale, offset in opts.input_scale:
        scales[task] = (scale, offset)
    if scales and opts.retrain is not None:
        raise OnnxZipError("--retrain-iters distils from the original files, which expect the scaled inputs; "
                           "it cannot be combined with --input-scale yet")
    return [fold_input_affine(n, *scales[t]) if t in scales else n for t, n in zip(opts.tasks, nets)]


def _check_retrain_inputs(opts: MergeOptions, nets: Sequence[Network]) -> None:
    """--retrain-iters trains every task on the merged input: the models must read one input form."""
    if opts.retrain is not None and not same_form(nets):
        forms = ", ".join(f"{t}: {list(n.input.shape)}" for t, n in zip(opts.tasks, nets))
        raise OnnxZipError(f"--retrain-iters trains every task on the merged input, but the models read their "
                           f"inputs in different forms ({forms}); it cannot combine them yet")


def _alignment_words(alignment: Alignment, nets: Sequence[Network], tasks: Sequence[str]) -> str:
    """Where sharing stops for each task whose layers align only in part, else ''."""
    return "; ".join(f"task {task}'s layers after '{net.layers[depth - 1].name}' are its own: {stop}"
                     for task, net, depth, stop in zip(tasks, nets, alignment.depths, alignment.stops) if stop)


def _check_partial_alignment(opts: MergeOptions, nets: Sequence[Network], alignment: Alignment) -> None:
    """What cannot yet work on models whose layers align only in part (different depths, say)."""
    if not alignment.stop:
        return
    what = ("--budget" if opts.budget is not None else "--target-size" if opts.target_size is not None
            else "--retrain-iters" if opts.retrain is not None else None)
    if what:
        raise OnnxZipError(f"{what} needs models whose hidden layers all align, but these align up to layer "
                           f"{nets[0].layers[min(alignment.depths) - 1].name} only ({alignment.stop}); use --share or "
                           "--share-layer instead")


def _check_layer_names(opts: MergeOptions, net: Network, depth: int) -> None:
    names, spaces = [l.name for l in net.layers], unit_spaces(net)
    for name, _ in opts.share_layers:
        if name not in names:
            raise OnnxZipError(f"--share-layer names unknown layer '{name}'; layers are {', '.join(names)}")
        k = names.index(name)
        if spaces.space[k] == spaces.space[-1]:
            raise OnnxZipError(f"--share-layer {name}: '{name}' is a task head, which is never shared")
        if k >= depth:
            raise OnnxZipError(f"--share-layer {name}: the models' layers align up to '{names[depth - 1]}' only, so "
                               f"'{name}' is each task's own")
        if spaces.space[k] != k:
            first = names[spaces.space[k]]
            raise OnnxZipError(f"--share-layer {name}: '{name}' adds into the units of '{first}' (a residual "
                               f"stream, paired once for all its layers); set the share on '{first}'")


def _check_method_on_tasks(opts: MergeOptions, tasks: Sequence[str], folders: Sequence[Path]) -> None:
    """The --cost method's needs on the tasks and their data (its declaration in pairing)."""
    chosen = method(opts.cost)
    if chosen.max_tasks is not None and len(tasks) > chosen.max_tasks:
        raise OnnxZipError(f"--cost {chosen.name} compares the units of two tasks; got {len(tasks)} models "
                           f"(use {_methods_without('max_tasks')})")
    if opts.max_cost is not None and not chosen.thresholdable:
        raise OnnxZipError(f"--max-cost needs a pair cost to threshold; --cost {chosen.name} chooses pairs without one")
    if not chosen.same_calibration or len({f.resolve() for f in folders}) == 1:
        return
    given = ", ".join(f"{t}={f}" for t, f in zip(tasks, folders))
    raise OnnxZipError(f"--cost {chosen.name} needs the same --calib data for every task (one folder), got {given}")


def _methods_without(need: str) -> str:
    """The pair-choice methods that do not have the requirement ``need``, for a hint."""
    names = [name for name, m in methods().items() if not getattr(m, need)]
    return ", ".join(names[:-1]) + " or " + names[-1]
