"""Light retraining (onnxzip.retrain, `onnxzip retrain`): sharing kept, exact write-back, fidelity recovered."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import builders as B
from onnxzip.api import merge
from onnxzip.format import weight_params
from onnxzip.errors import OnnxZipError
from onnxzip.merged import load_merged, task_part
from onnxzip.options import MergeOptions
from onnxzip.retrain import RetrainOptions, TORCH_HINT, retrain

torch = pytest.importorskip("torch")

from onnxzip.retrain.graph import build_module  # noqa: E402  (needs torch)
from onnxzip.retrain.train import TrainTask, predict, train  # noqa: E402
from onnxzip.retrain.writeback import RETRAIN_KEY, WRITEBACK_ATOL, WRITEBACK_RTOL, write_back  # noqa: E402
from torch_blocks import GroupedBlocks, MobileBlocks, SEBlock  # noqa: E402  (needs torch)

CPU = ["CPUExecutionProvider"]
SE_SHAPE = (1, 8, 8)
# The mobile blocks (depthwise convs, PRelu) downsample once: 12x12 leaves a 6x6 map.
MOBILE_SHAPE = (1, 12, 12)
# One PyTorch thread: tiny models train fastest that way, on a busy machine by far.
FAST = dict(device="cpu", threads=1)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "onnxzip.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env)


def _pair(tmp_path, kind="mlp", layout="multi", share=1.0, prune=0.0):
    """Two different tiny models merged at ``share``; returns (merged path, data folder, input shape)."""
    if kind in ("se", "mobile", "grouped"):  # SiLU, an SE gate, HardSwish; depthwise convs, PRelu; grouped convs
        for name, seed in (("a", 0), ("b", 1)):
            torch.manual_seed(seed)
            net = {"se": lambda: SEBlock("hard"), "mobile": lambda: MobileBlocks("prelu"),
                   "grouped": lambda: GroupedBlocks(seed)}[kind]()
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            B.export_torch(net, tmp_path / f"{name}.onnx", True, 18, SE_SHAPE if kind == "se" else MOBILE_SHAPE)
        wa = wb = None
        model, shape = None, SE_SHAPE if kind == "se" else MOBILE_SHAPE
    elif kind == "mlp":
        wa, wb = B.mlp_weights([64, 32, 16, 10], 0), B.mlp_weights([64, 32, 16, 10], 1)
        model, shape = B.mlp_model, (1, 8, 8)
    else:
        wa, wb = B.cnn_weights(0), B.cnn_weights(1)
        model, shape = B.cnn_model, (1, 12, 12)
    if prune:
        wa, wb = ([(np.where(np.abs(W) < np.quantile(np.abs(W), prune), 0, W).astype(np.float32), b)
                   for W, b in ws] for ws in (wa, wb))
    if model is not None:
        B.save(model(wa), tmp_path / "a.onnx")
        B.save(model(wb), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", shape, n=128)
    out = tmp_path / "m.onnx"
    merge([tmp_path / "a.onnx", tmp_path / "b.onnx"], calib, out, MergeOptions(share=share, layout=layout))
    return out, B.calib_folder(tmp_path / "data", shape, n=512, seed=5), shape


def _labelled(folder, model_path, shape, n, seed):
    """A data folder labelled with a model's own top-1 predictions."""
    x = np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
    return B.calib_folder(folder, shape, n=n, seed=seed, labels=B.run(model_path, x)[0].argmax(1))


def _uses(model_path, task):
    model, meta = load_merged(model_path)
    return {i.name for i in task_part(model, meta, model_path, task).graph.initializer}


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("kind,layout", [("mlp", "multi"), ("mlp", "gated"), ("cnn", "multi"), ("cnn", "gated"),
                                         ("se", "multi"), ("mobile", "gated"), ("grouped", "multi")])
def test_retraining_keeps_every_shared_block_one_tensor(tmp_path, kind, layout):
    merged, data, _ = _pair(tmp_path, kind, layout, share=0.5)
    out = tmp_path / "r.onnx"
    result = retrain(merged, data, out, RetrainOptions(iters=20, lr=1e-3, **FAST))
    before, after = onnx.load(str(merged)), onnx.load(str(out))
    # nothing re-exported: same nodes, same initializer names and shapes, same parameter count
    assert [(n.op_type, list(n.input), list(n.output)) for n in before.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in after.graph.node]
    old, new = _inits(merged), _inits(out)
    assert list(old) == [t.name for t in after.graph.initializer] and len(new) == len(after.graph.initializer)
    assert {k: v.shape for k, v in old.items()} == {k: v.shape for k, v in new.items()}
    assert weight_params(after) == weight_params(before) == result.params
    # every block both tasks used before is still one initializer that both use
    for task in ("a", "b"):
        assert _uses(out, task) == _uses(merged, task)
    shared = sorted(_uses(out, "a") & _uses(out, "b"))
    assert shared == sorted(n for n in new if ".shared." in n and "_from_task" not in n) and shared
    assert any(not np.array_equal(old[n], new[n]) for n in shared)  # shared blocks were trained
    # the module: one parameter per weight initializer, used by both tasks' programs
    model, meta = load_merged(merged)
    module = build_module(model, meta, merged)
    assert len(list(module.parameters())) == len(module.weight_names) == len(set(module.weight_names))
    assert sum(p.numel() for p in module.parameters()) == weight_params(before)
    for name in shared:
        assert all(any(name in n.inputs for n in module.programs[t].nodes) for t in ("a", "b"))
    # the rest of the metadata is kept; the run is recorded
    meta_before = {p.key: p.value for p in before.metadata_props}
    meta_after = {p.key: p.value for p in after.metadata_props}
    assert {k: v for k, v in meta_after.items() if k != RETRAIN_KEY} == meta_before
    record = json.loads(meta_after[RETRAIN_KEY])[-1]
    assert record["iterations"] == 20 and record["lr"] == 1e-3 and record["lr_schedule"] == "constant"
    assert record["loss"] == {"a": "distill", "b": "distill"}
    assert np.isfinite(record["loss_final"])
    assert all(r.max_diff_written <= WRITEBACK_ATOL + 1e-3 for r in result.tasks)


def _module_and_tasks(tmp_path, kind: str, layout: str, n: int):
    """A half-shared merged pair as a torch module, and two distillation tasks on n random samples
    with random teacher logits; returns (merged path, module, tasks, samples, input shape)."""
    merged, _, shape = _pair(tmp_path, kind, layout, share=0.5)
    model, meta = load_merged(merged)
    module = build_module(model, meta, merged)
    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    tasks = [TrainTask(t, x, rng.standard_normal((n, 10)).astype(np.float32), None, "distill", 1.0)
             for t in ("a", "b")]
    return merged, module, tasks, x, shape


def test_write_back_is_exact_and_refuses_bad_values(tmp_path):
    merged, module, tasks, x, shape = _module_and_tasks(tmp_path, "cnn", "gated", 128)
    train(module, tasks, RetrainOptions(iters=15, lr=1e-2, batch_size=32, **FAST), torch.device("cpu"))
    check_x = {t: x[:16] for t in ("a", "b")}
    expected = {t: predict(module, t, check_x[t], 64, torch.device("cpu")) for t in ("a", "b")}
    out = tmp_path / "r.onnx"
    values = module.weight_arrays()
    diffs = write_back(onnx.load(str(merged)), values, {"iterations": 15}, out, ["a", "b"], "gated", check_x,
                       expected, CPU)
    assert set(diffs) == {"a", "b"}
    written = _inits(out)
    assert all(np.array_equal(written[n], v) for n, v in values.items())  # bit for bit, by name
    fresh = np.random.default_rng(1).random((40, *shape), dtype=np.float32)  # samples the write-back check never saw
    for t, task in enumerate(("a", "b")):
        y_ort = B.run(out, fresh, {"task": np.array(t, np.int64)})[0]
        y_torch = predict(module, task, fresh, 64, torch.device("cpu"))
        np.testing.assert_allclose(y_ort, y_torch, rtol=WRITEBACK_RTOL, atol=WRITEBACK_ATOL)
    # non-finite values and a file that does not reproduce the module are refused; nothing is written
    bad = tmp_path / "bad.onnx"
    name = next(n for n in values if ".shared." in n)
    with pytest.raises(OnnxZipError, match=name):
        write_back(onnx.load(str(merged)), {**values, name: values[name] * np.nan}, {}, bad, ["a", "b"], "gated",
                   check_x, expected, CPU)
    with pytest.raises(OnnxZipError, match="differs from the retrained module"):
        write_back(onnx.load(str(merged)), values, {}, bad, ["a", "b"], "gated", check_x,
                   {t: y + 1.0 for t, y in expected.items()}, CPU)
    assert not bad.exists() and not list(tmp_path.glob(".bad.onnx.*"))


def test_label_free_run_raises_fidelity(tmp_path):
    merged, data, _ = _pair(tmp_path, "mlp", "multi", share=1.0)
    out = tmp_path / "r.onnx"
    opts = RetrainOptions(iters=120, lr=3e-3, holdout=0.25, **FAST)
    result = retrain(merged, data, out, opts)
    for row in result.tasks:
        assert row.loss == "distill" and row.train_samples == 384 and row.heldout_samples == 128
        assert row.fidelity_after > row.fidelity_before + 0.03, row
        assert row.accuracy_before is None and row.accuracy_after is None
    assert result.loss_final < result.loss_first
    # seeded: the same run writes the same weights
    again = retrain(merged, data, tmp_path / "r2.onnx", opts)
    assert again.tasks == result.tasks
    assert all(np.array_equal(v, _inits(tmp_path / "r2.onnx")[n]) for n, v in _inits(out).items())


def test_labels_give_accuracy_before_and_after(tmp_path):
    merged, _, shape = _pair(tmp_path, "mlp", "multi", share=1.0)
    data = {t: _labelled(tmp_path / f"data_{t}", tmp_path / f"{t}.onnx", shape, 1000, seed) for t, seed in
            (("a", 11), ("b", 12))}
    evals = {"b": _labelled(tmp_path / "eval_b", tmp_path / "b.onnx", shape, 200, 13)}
    result = retrain(merged, data, tmp_path / "r.onnx", RetrainOptions(iters=200, lr=1e-2, holdout=0.25, **FAST),
                     evals=evals)
    a, b = result.tasks
    assert a.loss == b.loss == "labels"
    for row in (a, b):
        assert row.accuracy_teacher == 1.0  # the labels are the teachers' own predictions
        assert row.accuracy_after > row.accuracy_before + 0.02, row
    assert a.accuracy_before == a.fidelity_before  # task a: accuracy on its labelled held-out part
    result = retrain(merged, data, tmp_path / "m2.onnx", RetrainOptions(iters=5, loss="mix", **FAST))
    assert [r.loss for r in result.tasks] == ["mix", "mix"]
    opts = RetrainOptions(iters=5, task_loss=(("b", "mix"),), temperature=4.0, **FAST)
    result = retrain(merged, data, tmp_path / "m3.onnx", opts)
    assert [r.loss for r in result.tasks] == ["labels", "mix"]
    record = json.loads(load_merged(tmp_path / "m3.onnx")[1]["retrain"])[-1]
    assert record["loss"] == {"a": "labels", "b": "mix"} and record["temperature"] == 4.0


def test_task_weights_scale_each_task_loss(tmp_path):
    merged, data, _ = _pair(tmp_path, "mlp", "multi", share=0.5)

    def first_loss(wa, wb, name):
        opts = RetrainOptions(iters=1, task_weight=(("a", wa), ("b", wb)), **FAST)
        return retrain(merged, data, tmp_path / name, opts).loss_first

    base, a, b = first_loss(1, 1, "w11.onnx"), first_loss(2, 1, "w21.onnx"), first_loss(1, 2, "w12.onnx")
    loss_a, loss_b = a - base, b - base  # the unweighted losses of the first batch
    assert loss_a > 0 and loss_b > 0 and abs(loss_a - loss_b) > 1e-3  # the tasks are told apart
    assert first_loss(3, 0.5, "w.onnx") == pytest.approx(3 * loss_a + 0.5 * loss_b, rel=1e-5)
    record = json.loads(load_merged(tmp_path / "w.onnx")[1]["retrain"])[-1]
    assert record["weight"] == {"a": 3.0, "b": 0.5}
    assert RetrainOptions(task_weight=(("c", 2.0),)).task_weights(("a", "b", "c")) == (1.0, 1.0, 2.0)
    assert RetrainOptions(alpha=0.7).task_weights(("a", "b")) == pytest.approx((1.4, 0.6))


def test_pruned_weights_keep_their_zeros(tmp_path):
    merged, data, _ = _pair(tmp_path, "mlp", "multi", share=0.5, prune=0.6)
    model, meta = load_merged(merged)
    module = build_module(model, meta, merged)
    assert module.sparse_names and all(".W" in n for n in module.sparse_names)  # weights, never biases
    out = tmp_path / "r.onnx"
    retrain(merged, data, out, RetrainOptions(iters=30, lr=1e-2, optimizer="sgd", **FAST))
    old, new = _inits(merged), _inits(out)
    for name in module.sparse_names:
        np.testing.assert_array_equal(new[name] == 0, old[name] == 0)
    assert any(not np.array_equal(old[n], new[n]) for n in module.sparse_names)


def test_every_emitted_op_runs_the_same_in_torch(tmp_path):
    """LeakyRelu, asymmetric AveragePool pads, Clip, GlobalAveragePool, Sigmoid, Tanh, Softmax/LogSoftmax."""
    rng = np.random.default_rng(0)

    def cnn(seed, head):
        r = np.random.default_rng(seed)
        inits = [numpy_helper.from_array(r.standard_normal(s).astype(np.float32) * 0.5, n) for n, s in
                 (("W1", (4, 1, 3, 3)), ("W2", (6, 4, 3, 3)), ("b2", (6,)), ("W3", (6, 5)), ("W4", (5, 3)))]
        nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                                  pads=[1, 0, 0, 1]),
                 helper.make_node("LeakyRelu", ["c1"], ["l1"], name="leaky", alpha=0.2),
                 helper.make_node("AveragePool", ["l1"], ["p1"], name="avg", kernel_shape=[2, 2], strides=[2, 2],
                                  pads=[0, 0, 1, 1]),
                 helper.make_node("Conv", ["p1", "W2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3],
                                  pads=[1, 1, 1, 1]),
                 helper.make_node("Clip", ["c2", "lo", "hi"], ["k2"], name="clip"),
                 helper.make_node("GlobalAveragePool", ["k2"], ["g"], name="gap"),
                 helper.make_node("Flatten", ["g"], ["f"], name="flat"),
                 helper.make_node("MatMul", ["f", "W3"], ["m3"], name="fc1"),
                 helper.make_node("Sigmoid", ["m3"], ["s3"], name="sig"),
                 helper.make_node("Tanh", ["s3"], ["t3"], name="tanh"),
                 helper.make_node("MatMul", ["t3", "W4"], ["m4"], name="fc2"),
                 helper.make_node(head, ["m4"], ["logits"], name="head", axis=-1)]
        inits += [numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
                  numpy_helper.from_array(np.array(1.5, np.float32), "hi")]
        return B._model(nodes, inits, (1, 9, 9), 3, "ops")

    for head in ("Softmax", "LogSoftmax"):
        folder = tmp_path / head
        folder.mkdir()
        B.save(cnn(0, head), folder / "a.onnx")
        B.save(cnn(1, head), folder / "b.onnx")
        merged = folder / "m.onnx"
        merge([folder / "a.onnx", folder / "b.onnx"], B.calib_folder(folder / "c", (1, 9, 9), 64), merged,
              MergeOptions(share=0.5, layout="gated"))
        model, meta = load_merged(merged)
        module = build_module(model, meta, merged)
        assert {n.op for p in module.programs.values() for n in p.nodes} >= \
            {"LeakyRelu", "AveragePool", "Clip", "GlobalAveragePool", "Sigmoid", "Tanh", head}
        x = rng.random((8, 1, 9, 9), dtype=np.float32)
        for t, task in enumerate(("a", "b")):
            y = predict(module, task, x, 8, torch.device("cpu"))
            np.testing.assert_allclose(y, B.run(merged, x, {"task": np.array(t, np.int64)})[0], rtol=1e-4, atol=1e-5)
            # losses see the logits: the head is found behind the gated layout's Identity nodes
            assert module.programs[task].head == head
            with torch.no_grad():
                logits = module(torch.from_numpy(x), task, logits=True)
            again = torch.softmax(logits, 1) if head == "Softmax" else torch.log_softmax(logits, 1)
            np.testing.assert_allclose(again.numpy(), y, rtol=1e-5, atol=1e-6)
        data = B.calib_folder(folder / "d", (1, 9, 9), 64, seed=3)
        result = retrain(merged, data, folder / "r.onnx", RetrainOptions(iters=3, batch_size=16, **FAST))
        assert all(np.isfinite(r.fidelity_after) for r in result.tasks)


def test_unsupported_op_is_refused_by_name(tmp_path):
    merged, _, _ = _pair(tmp_path, "mlp", "multi", share=0.5)
    model = onnx.load(str(merged))
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.op_type = "Sin"
    odd = tmp_path / "odd.onnx"
    onnx.save(model, str(odd))
    loaded, meta = load_merged(odd)
    with pytest.raises(OnnxZipError, match=rf"node '{node.name}' \(Sin\) is not supported"):
        build_module(loaded, meta, odd)


def test_cli_retrain_with_teachers_and_labels(tmp_path):
    merged, data, shape = _pair(tmp_path, "mlp", "gated", share=0.5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = shutil.copy(merged, elsewhere / "m.onnx")  # the source models are not next to it any more
    out = elsewhere / "r.onnx"
    proc = _cli("retrain", moved, "--data", data, "-o", out, "--iters", 5)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {moved}: the source model of task 'a' (a.onnx) is not next to it; pass --teacher a=MODEL.onnx"]
    assert not out.exists()
    ev = _labelled(tmp_path / "ev", tmp_path / "a.onnx", shape, 64, 21)
    proc = _cli("retrain", moved, "--data", f"a={data}", "--data", f"b={data}", "--teacher", f"a={tmp_path / 'a.onnx'}",
                "--teacher", f"b={tmp_path / 'b.onnx'}", "--eval", f"a={ev}", "--iters", 10, "--lr", "1e-3",
                "--threads", 1, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "onnxzip retrain" in proc.stdout and "fidelity before" in proc.stdout and "100.00%" in proc.stdout
    assert "(unchanged)" in proc.stdout and out.exists()
    # a file of the recorded name that is not the recorded source is refused
    shutil.copy(tmp_path / "b.onnx", elsewhere / "a.onnx")
    with pytest.raises(OnnxZipError, match=r"a.onnx: is not the source model of task 'a'.*SHA-256.*--teacher a="):
        retrain(moved, data, tmp_path / "x.onnx", teachers={"b": tmp_path / "b.onnx"})


def test_cli_user_error_is_one_line(tmp_path):
    merged, data, _ = _pair(tmp_path, "mlp", "multi", share=0.5)
    out = tmp_path / "r.onnx"
    proc = _cli("retrain", merged, "--data", data, "--loss", "labels", "-o", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {data}: --loss labels needs labels, but not every .npz file of task 'a' has a 'labels' array"]
    proc = _cli("retrain", merged, "--data", data, "--task-loss", "b=mix", "-o", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {data}: --task-loss b=mix needs labels, but not every .npz file of task 'b' has a 'labels' array"]
    proc = _cli("retrain", merged, "--data", data, "--task-weight", "b=heavy", "-o", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --task-weight: 'heavy' is neither a fraction nor a count"]
    assert not out.exists()


@pytest.mark.parametrize("case,needle", [
    ("unknown data task", "--data names unknown task(s) c"),
    ("missing data task", "--data gives no folder for task(s) b"),
    ("unknown teacher task", "--teacher names unknown task(s) c"),
    ("unknown eval task", "--eval names unknown task(s) c"),
    ("overwrite", "would overwrite the merged model"),
    ("mix without labels", "--loss mix needs labels"),
    ("per-task labels without labels", "--task-loss b=labels needs labels"),
    ("unknown task-loss task", "--task-loss names unknown task(s) c; "),
    ("unknown task-weight task", "--task-weight names unknown task(s) c; "),
])
def test_user_errors_name_the_option(tmp_path, case, needle):
    merged, data, _ = _pair(tmp_path, "mlp", "multi", share=0.5)
    out = tmp_path / "r.onnx"
    args = dict(data=data, output=out, options=RetrainOptions(**FAST))
    args.update({"unknown data task": dict(data={"a": data, "c": data}), "missing data task": dict(data={"a": data}),
                 "unknown teacher task": dict(teachers={"c": "x.onnx"}), "unknown eval task": dict(evals={"c": data}),
                 "overwrite": dict(output=merged),
                 "mix without labels": dict(options=RetrainOptions(loss="mix", **FAST)),
                 "per-task labels without labels": dict(options=RetrainOptions(task_loss=(("b", "labels"),), **FAST)),
                 "unknown task-loss task": dict(options=RetrainOptions(task_loss=(("c", "mix"),), **FAST)),
                 "unknown task-weight task": dict(options=RetrainOptions(task_weight=(("c", 2.0),), **FAST))}[case])
    with pytest.raises(OnnxZipError) as info:
        retrain(merged, **args)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("field,value", [("iters", 0), ("lr", 0.0), ("holdout", 1.0), ("loss", "l2"),
                                         ("optimizer", "lbfgs"), ("threads", 0), ("samples", 1), ("alpha", 1.0),
                                         ("lr_schedule", "step"), ("task_loss", (("a", "l2"),)),
                                         ("task_loss", (("a", "mix"), ("a", "labels"))),
                                         ("task_weight", (("a", 0.0),)), ("task_weight", (("a", float("nan")),)),
                                         ("task_weight", (("a", 1.0), ("a", 2.0)))])
def test_options_are_checked(field, value):
    with pytest.raises(OnnxZipError, match=f"--{field.replace('_', '-')}"):
        RetrainOptions(**{field: value})


def test_alpha_and_task_weight_are_exclusive():
    with pytest.raises(OnnxZipError, match="--alpha and --task-weight"):
        RetrainOptions(alpha=0.7, task_weight=(("a", 2.0),))
    with pytest.raises(OnnxZipError, match="use --task-weight"):
        RetrainOptions(alpha=0.7).task_weights(("a", "b", "c"))


def test_the_loop_steps_at_the_scheduled_rate(tmp_path, monkeypatch):
    _, module, tasks, _, _ = _module_and_tasks(tmp_path, "mlp", "multi", 64)
    seen, step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                         step(self, *a, **k))[1])
    for schedule in ("constant", "cosine"):
        train(module, tasks, RetrainOptions(iters=8, lr=1e-2, lr_schedule=schedule, **FAST), torch.device("cpu"))
    constant, cosine = seen[:8], seen[8:]
    assert constant == [1e-2] * 8
    # cosine annealing from --lr to 0: lr/2 (1 + cos(pi t / T)), t = 0 .. T-1
    np.testing.assert_allclose(cosine, [5e-3 * (1 + np.cos(np.pi * t / 8)) for t in range(8)], rtol=1e-12)
    assert cosine[0] == 1e-2 and cosine[4] == pytest.approx(5e-3) and all(np.diff(cosine) < 0) and cosine[-1] < 4e-4


def test_cli_without_torch_prints_the_install_hint(tmp_path):
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(fake)}
    out = tmp_path / "r.onnx"
    proc = _cli("retrain", tmp_path / "m.onnx", "--data", tmp_path, "-o", out, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {TORCH_HINT}"]
    assert TORCH_HINT == 'onnxzip retrain needs PyTorch: pip install "onnxzip[torch]"'
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-c", "import onnxzip.retrain, onnxzip.cli.main"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # importing needs no torch


def test_merge_retrains_after_each_zipped_layer(tmp_path):
    wa, wb = B.mlp_weights([64, 32, 16, 10], 0), B.mlp_weights([64, 32, 16, 10], 1)
    for name, w in (("a", wa), ("b", wb)):
        B.save(B.mlp_model(w), tmp_path / f"{name}.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 8, 8), n=512)
    models = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    plain = merge(models, calib, tmp_path / "m.onnx", MergeOptions(correct=False))
    opts = MergeOptions(correct=False, retrain=RetrainOptions(iters=60, lr=3e-3, holdout=0.25, **FAST))
    result = merge(models, calib, tmp_path / "r.onnx", opts)
    # one round after each zipped hidden layer, each seeing its layer's sharing
    assert [r.after_layer for r in result.retraining] == [l.name for l in result.plan.layers[:-1]]
    assert all(r.iterations == 60 and r.tasks == ("a", "b") for r in result.retraining)
    assert result.plan.layers == plain.plan.layers[:1] + result.plan.layers[1:]  # layer 1 zipped as without
    assert result.params_merged == plain.params_merged
    for check, before in zip(result.checks, plain.checks):
        assert check.max_diff_vs_tied < 1e-4  # emitted == tied after the retrained rounds
        assert check.rel_output_error < 0.85 * before.rel_output_error, (check, before)
        assert check.top1_agreement > before.top1_agreement, (check, before)
    last = result.retraining[-1]
    assert all(a > b for a, b in zip(last.fidelity_after, last.fidelity_before))
    # the sharing is kept: every shared block one tensor that both tasks use
    assert sorted(_uses(tmp_path / "r.onnx", "a") & _uses(tmp_path / "r.onnx", "b")) == \
        sorted(_uses(tmp_path / "m.onnx", "a") & _uses(tmp_path / "m.onnx", "b"))


def test_merge_retrains_a_residual_net_once_each_stream_is_tied(tmp_path):
    """Inverted residuals: the stem's stream is paired at the stem but written again by the projection;
    retraining runs only where every paired stream has all its writers tied (before, a round after the
    stem emitted the partial model with the stream half tied and failed)."""
    paths = B.mobile_pair(tmp_path / "m")
    calib = B.calib_folder(tmp_path / "calib", MOBILE_SHAPE, n=64)
    merge(paths, calib, tmp_path / "plain.onnx", MergeOptions(share=0.5))
    opts = MergeOptions(share=0.5, retrain=RetrainOptions(iters=5, lr=1e-3, **FAST))
    result = merge(paths, calib, tmp_path / "r.onnx", opts)
    names = [lp.name for lp in result.plan.layers]
    assert [r.after_layer for r in result.retraining] == names[names.index("conv5"):-1]  # proj (conv5) closes the stream
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks)
    # the depthwise kernels were trained too, and what they learnt is kept (written back into the tied nets)
    plain, trained = _inits(tmp_path / "plain.onnx"), _inits(tmp_path / "r.onnx")
    for name in ("dw1.shared.W", "dw2.shared.W", "dw1.task_a.W"):
        assert plain[name].shape == trained[name].shape and not np.array_equal(plain[name], trained[name])


def test_merge_retrains_a_grouped_conv_net_and_keeps_its_groups(tmp_path):
    """Retraining after each zipped layer of a net of grouped convs: emitted == tied, every grouped conv's
    blocks still grouped Convs (none densified) and every shared block one tensor."""
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        paths.append(B.export_torch(GroupedBlocks(seed), tmp_path / f"{name}.onnx", True, 18, MOBILE_SHAPE))
    calib = B.calib_folder(tmp_path / "calib", MOBILE_SHAPE, n=128)
    plain = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(share=0.5))
    opts = MergeOptions(share=0.5, retrain=RetrainOptions(iters=10, lr=1e-3, **FAST))
    result = merge(paths, calib, tmp_path / "r.onnx", opts)
    # rounds only where the networks are consistent with the plan so far: the stream's last writer and the
    # grouped convs reading the stream and the mix conv's units tied
    assert [r.after_layer for r in result.retraining] == ["gconv2", "gconv3"]
    assert all(c.max_diff_vs_tied < 1e-4 for c in result.checks)
    assert result.params_merged == plain.params_merged
    for path in (tmp_path / "m.onnx", tmp_path / "r.onnx"):
        groups = {n.name.split(".")[0]: next((a.i for a in n.attribute if a.name == "group"), 1)
                  for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" and ".task_" in n.name}
        assert {k: v for k, v in groups.items() if k.startswith("gconv")} == {"gconv1": 2, "gconv2": 1, "gconv3": 3}
    assert sorted(_uses(tmp_path / "r.onnx", "a") & _uses(tmp_path / "r.onnx", "b")) == \
        sorted(_uses(tmp_path / "m.onnx", "a") & _uses(tmp_path / "m.onnx", "b"))


def test_cli_merge_retrain_iters(tmp_path):
    wa, wb = B.mlp_weights([64, 32, 16, 10], 0), B.mlp_weights([64, 32, 16, 10], 1)
    for name, w in (("a", wa), ("b", wb)):
        B.save(B.mlp_model(w), tmp_path / f"{name}.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 8, 8), n=256)
    out = tmp_path / "r.onnx"
    proc = _cli("merge", tmp_path / "a.onnx", tmp_path / "b.onnx", "--calib", calib, "--retrain-iters", 10,
                "--retrain-lr", 1e-3, "--share", 0.5, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "retraining after each zipped layer" in proc.stdout and out.exists()
    proc = _cli("merge", tmp_path / "a.onnx", tmp_path / "b.onnx", "--calib", calib, "--retrain-iters", -1,
                "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --retrain-iters must be a non-negative integer, got -1"]


def test_cli_merge_retrain_without_torch_prints_the_install_hint(tmp_path):
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(fake)}
    for name, seed in (("a", 0), ("b", 1)):
        B.save(B.mlp_model(B.mlp_weights([64, 32, 16, 10], seed)), tmp_path / f"{name}.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 8, 8), n=64)
    out = tmp_path / "m.onnx"
    proc = _cli("merge", tmp_path / "a.onnx", tmp_path / "b.onnx", "--calib", calib, "--retrain-iters", 5,
                "-o", out, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'error: onnxzip merge --retrain-iters needs PyTorch: pip install "onnxzip[torch]"']
    assert not out.exists()
