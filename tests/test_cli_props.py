"""Property-based: any option value, any string, never a traceback — the command line either runs or
prints one 'error: ' line and exits 2; the options objects either build or raise OnnxZipError."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from onnxzip.cli.main import main
from onnxzip.errors import OnnxZipError
from onnxzip.options import MergeOptions, parse_size
from onnxzip.retrain.options import RetrainOptions

EXAMPLES = 80
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MERGE_VALUE_FLAGS = ["--share", "--share-layer", "--max-cost", "--alpha", "--cost", "--solver", "--stream-pairing",
                     "--layout", "--image-layout", "--tasks", "--calib-samples", "--batch-size", "--max-patches", "--resize", "--mean",
                     "--std", "--eval", "--damping", "--verify-samples", "--device", "--seed", "--budget",
                     "--budget-data", "--target-size", "--input-scale", "--calib", "--retrain-lr",
                     "--retrain-lr-schedule", "--retrain-optimizer", "--retrain-batch-size", "--retrain-data"]
RETRAIN_VALUE_FLAGS = ["--data", "--teacher", "--eval", "--iters", "--lr", "--batch-size", "--alpha", "--loss",
                       "--task-loss", "--task-weight", "--mix", "--temperature", "--optimizer", "--lr-schedule",
                       "--holdout", "--samples", "--verify-samples", "--resize", "--mean", "--std",
                       "--image-layout", "--device", "--threads", "--seed"]

# Text that looks like what people type: numbers, lists, key=value, sizes, plus arbitrary unicode.
_numberish = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(repr),
                       st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", "", " ", "1.", ".5"]))
_piece = st.one_of(_numberish, st.text(max_size=12), st.sampled_from(["a", "b", "fc1", "conv1", "=", ",", "x"]))
_value = st.one_of(_piece, st.lists(_piece, min_size=1, max_size=4).map(",".join),
    st.tuples(_piece, _piece).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(_piece, _piece, _piece).map(lambda kv: f"{kv[0]}={kv[1]},{kv[2]}"))


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def _one_error_line(capsys) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


@PROPS
@given(flag=st.sampled_from(MERGE_VALUE_FLAGS), value=_value)
def test_merge_option_values_never_give_a_traceback(tmp_path_factory, capsys, flag, value):
    """The models do not exist: a value that parses ends at 'no such file', one that does not
    at its own message; both one line, exit 2."""
    root = tmp_path_factory.getbasetemp()
    argv = ["merge", str(root / "missing_a.onnx"), str(root / "missing_b.onnx"), "-o", str(root / "never.onnx"),
            "--calib", str(root), flag, value]
    capsys.readouterr()
    assert _exit_code(argv) == 2
    _one_error_line(capsys)
    assert not (root / "never.onnx").exists()


@PROPS
@given(flag=st.sampled_from(RETRAIN_VALUE_FLAGS), value=_value)
def test_retrain_option_values_never_give_a_traceback(tmp_path_factory, capsys, flag, value):
    root = tmp_path_factory.getbasetemp()
    argv = ["retrain", str(root / "missing_merged.onnx"), "-o", str(root / "never.onnx"), "--data", str(root),
            flag, value]
    capsys.readouterr()
    assert _exit_code(argv) == 2
    _one_error_line(capsys)


@PROPS
@given(argv=st.lists(st.one_of(st.sampled_from(["merge", "split", "inspect", "retrain", "-o", "--task", "--tasks",
                                                "--share", "--calib", "--", "-"]), _piece), max_size=6))
def test_any_argument_list_gives_one_line_or_runs(capsys, argv):
    capsys.readouterr()
    code = _exit_code(argv)
    assert code in (0, 2), (argv, code)
    if code == 2:
        _one_error_line(capsys)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=16), _numberish, st.integers(-10, 10**15)))
def test_target_sizes_parse_or_are_refused(text):
    try:
        value, unit = parse_size(text)
    except OnnxZipError as exc:
        assert "--target-size" in str(exc)
        return
    assert value >= 0 and unit in ("params", "bytes")


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))


@settings(max_examples=300, deadline=None)
@given(share=_floats, alpha=_floats, damping=_floats, budget=st.none() | _floats, max_cost=st.none() | _floats,
       batch=st.integers(-3, 5), verify=st.integers(-3, 5), seed=st.integers(-3, 3),
       layers=st.lists(st.tuples(st.text(max_size=4), _floats), max_size=2))
def test_merge_options_build_or_raise_a_user_error(share, alpha, damping, budget, max_cost, batch, verify, seed,
                                                   layers):
    try:
        opts = MergeOptions(share=share, alpha=alpha, damping=damping, budget=budget, max_cost=max_cost,
                            batch_size=batch, verify_samples=verify, seed=seed, share_layers=tuple(layers))
    except OnnxZipError:
        return
    assert 0 <= opts.share <= 1 and 0 < opts.alpha < 1 and opts.verify_samples >= 1 and opts.batch_size >= 1
    assert opts.damping > 0 and (opts.budget is None or opts.budget >= 0)
    assert opts.max_cost is None or opts.max_cost > 0


@settings(max_examples=300, deadline=None)
@given(iters=st.integers(-3, 10), lr=_floats, batch=st.integers(-3, 5), holdout=_floats, mix=_floats,
       temperature=_floats, verify=st.integers(-3, 5), weights=st.lists(st.tuples(st.text(max_size=3), _floats),
                                                                        max_size=2))
def test_retrain_options_build_or_raise_a_user_error(iters, lr, batch, holdout, mix, temperature, verify, weights):
    try:
        opts = RetrainOptions(iters=iters, lr=lr, batch_size=batch, holdout=holdout, mix=mix,
                              temperature=temperature, verify_samples=verify, task_weight=tuple(weights))
    except OnnxZipError:
        return
    assert opts.verify_samples >= 1 and opts.batch_size >= 1 and math.isfinite(opts.lr) and opts.lr > 0
