"""The progress protocol (onnxzip/progress.py): a silent reporter's ticks do nothing and return nothing."""

from onnxzip.progress import UNIT_BATCHES, UNIT_MODELS, UNIT_STEPS, UNIT_TASKS, no_progress


def test_no_progress_ticks_silently(capsys):
    tick = no_progress("layer fc1", 3, UNIT_BATCHES)
    assert [tick() for _ in range(3)] == [None] * 3
    assert capsys.readouterr() == ("", "")


def test_units_are_distinct_words():
    units = (UNIT_BATCHES, UNIT_TASKS, UNIT_STEPS, UNIT_MODELS)
    assert len(set(units)) == len(units) and all(u.isalpha() for u in units)
