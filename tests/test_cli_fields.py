"""The command line's options come from the options dataclasses (cli/fields.py): every cli_field is
a flag, its default is the field's, and what the flag sets reaches the options object unchanged."""

import dataclasses

import pytest

from onnxzip.cli import main as cli
from onnxzip.options import CLI_KEY, MergeOptions
from onnxzip.retrain.options import RetrainOptions

# A value other than the default for each generated MergeOptions / RetrainOptions option.
MERGE_VALUES = {"share": ("--share", "0.25", 0.25), "max_cost": ("--max-cost", "0.5", 0.5),
                "alpha": ("--alpha", "0.3", 0.3), "cost": ("--cost", "l2", "l2"),
                "solver": ("--solver", "greedy", "greedy"), "correct": ("--no-correct", None, False),
                "damping": ("--damping", "0.05", 0.05), "correct_damping": ("--correct-damping", "0.01", 0.01),
                "calib_samples": ("--calib-samples", "7", 7), "max_patches": ("--max-patches", "9", 9),
                "batch_size": ("--batch-size", "5", 5), "verify_samples": ("--verify-samples", "3", 3),
                "device": ("--device", "cpu", "cpu"), "seed": ("--seed", "4", 4),
                "budget": ("--budget", "0.5", 0.5), "target_size": ("--target-size", "800KB", "800KB"),
                "stream_pairing": ("--stream-pairing", "early", "early"),
                "guide_samples": ("--guide-samples", "0", 0), "quantize": ("--quantize", "static", "static"),
                "card": ("--no-card", None, False)}
RETRAIN_VALUES = {"iters": ("--iters", "5", 5), "lr": ("--lr", "0.01", 0.01), "batch_size": ("--batch-size", "8", 8),
                  "alpha": ("--alpha", "0.25", 0.25), "loss": ("--loss", "distill", "distill"),
                  "mix": ("--mix", "0.75", 0.75), "temperature": ("--temperature", "2", 2.0),
                  "optimizer": ("--optimizer", "sgd", "sgd"), "lr_schedule": ("--lr-schedule", "cosine", "cosine"),
                  "holdout": ("--holdout", "0.2", 0.2), "samples": ("--samples", "50", 50),
                  "verify_samples": ("--verify-samples", "4", 4), "device": ("--device", "cpu", "cpu"),
                  "threads": ("--threads", "1", 1), "seed": ("--seed", "3", 3)}


class _Captured(Exception):
    pass


def _capture(monkeypatch, name: str):
    def stop(*args, **kwargs):
        raise _Captured(args[3])  # the options object
    monkeypatch.setattr(cli, name, stop)
    monkeypatch.setattr(cli, "require_torch", lambda *a: None)


def _options(argv: list[str]):
    with pytest.raises(_Captured) as got:
        cli._run(argv)
    return got.value.args[0]


def _generated(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if CLI_KEY in f.metadata}


def test_every_generated_merge_option_has_a_test_value():
    assert set(MERGE_VALUES) == _generated(MergeOptions) and set(RETRAIN_VALUES) == _generated(RetrainOptions)


def test_merge_defaults_are_the_options_defaults(monkeypatch):
    _capture(monkeypatch, "run_merge")
    assert _options(["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--calib", "c"]) == MergeOptions()


@pytest.mark.parametrize("name", sorted(MERGE_VALUES))
def test_each_merge_flag_sets_its_field(monkeypatch, name):
    _capture(monkeypatch, "run_merge")
    flag, text, value = MERGE_VALUES[name]
    extra = [flag] + ([text] if text is not None else [])
    opts = _options(["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--calib", "c", *extra])
    assert getattr(opts, name) == value
    assert all(getattr(opts, f) == getattr(MergeOptions(), f) for f in _generated(MergeOptions) - {name})


def test_retrain_defaults_and_flags_are_the_options(monkeypatch):
    _capture(monkeypatch, "run_retrain")
    base = ["retrain", "m.onnx", "-o", "r.onnx", "--data", "d"]
    assert _options(base) == RetrainOptions()
    for name, (flag, text, value) in RETRAIN_VALUES.items():
        assert getattr(_options(base + [flag, text]), name) == value, name
