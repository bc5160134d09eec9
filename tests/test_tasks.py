"""Task names and per-task arguments (onnxzip.tasks): one check for names that are not tasks."""

from pathlib import Path

import pytest

from onnxzip.errors import OnnxZipError
from onnxzip.tasks import check_known, per_task, some_tasks, task_names

TASKS = ("a", "b")


def test_task_names_from_files_are_identifiers_and_unique():
    assert task_names([Path("x/lenet-5.onnx"), Path("y/lenet-5.onnx")], ()) == ("lenet_5_0", "lenet_5_1")
    assert task_names([Path("a.onnx"), Path("b.onnx")], ("mnist", "fashion")) == ("mnist", "fashion")
    with pytest.raises(OnnxZipError, match="--tasks needs 2 distinct names"):
        task_names([Path("a.onnx"), Path("b.onnx")], ("x", "x"))
    with pytest.raises(OnnxZipError, match="task name '9x'"):
        task_names([Path("a.onnx"), Path("b.onnx")], ("9x", "y"))


def test_unknown_names_are_listed_sorted_once_with_the_tasks():
    check_known("--eval", ["b", "a"], TASKS)
    with pytest.raises(OnnxZipError, match=r"^--eval names unknown task\(s\) c, d; tasks are a, b$"):
        check_known("--eval", ["d", "c", "d", "a"], TASKS)
    with pytest.raises(OnnxZipError, match=r"^--task-weight names unknown task\(s\) z; m.onnx has tasks a, b$"):
        check_known("--task-weight", ["z"], TASKS, Path("m.onnx"))


def test_per_task_folders():
    assert per_task("d", TASKS, "--calib") == [Path("d"), Path("d")]
    assert per_task({"b": "y", "a": "x"}, TASKS, "--calib") == [Path("x"), Path("y")]
    with pytest.raises(OnnxZipError, match=r"--calib gives no folder for task\(s\) b"):
        per_task({"a": "x"}, TASKS, "--calib")
    with pytest.raises(OnnxZipError, match=r"--calib names unknown task\(s\) c"):
        per_task({"a": "x", "b": "y", "c": "z"}, TASKS, "--calib")
    assert some_tasks(None, TASKS, "--eval") == {} and some_tasks({"b": "e"}, TASKS, "--eval") == {"b": Path("e")}
