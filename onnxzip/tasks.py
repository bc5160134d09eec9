"""Tasks and per-task arguments: task names from the model files, one folder per task from one
folder or a {task: folder} mapping, and the one check for names that are not tasks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import OnnxZipError

TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FALLBACK_NAME = "task"


def task_names(paths: Sequence[Path], given: Sequence[str]) -> tuple[str, ...]:
    """Task names: as given, else the files' stems made identifier-safe and unique."""
    if given:
        if len(given) != len(paths) or len(set(given)) != len(given):
            raise OnnxZipError(f"--tasks needs {len(paths)} distinct names, got {', '.join(given)}")
        names = list(given)
    else:
        names = [re.sub(r"\W", "_", p.stem) or FALLBACK_NAME for p in paths]
        if len(set(names)) != len(names):
            names = [f"{n}_{i}" for i, n in enumerate(names)]
    for n in names:
        if not TASK_NAME.fullmatch(n):
            raise OnnxZipError(f"task name '{n}' must be a letter or '_' followed by letters, digits or '_'")
    return tuple(names)


def check_known(flag: str, named: Iterable[str], tasks: Sequence[str], owner: str | Path | None = None) -> None:
    """Refuse the names ``flag`` gives that are not tasks; ``owner`` is the file the tasks are read from."""
    unknown = sorted(set(named) - set(tasks))
    if unknown:
        where = f"{owner} has tasks" if owner else "tasks are"
        raise OnnxZipError(f"{flag} names unknown task(s) {', '.join(unknown)}; {where} {', '.join(tasks)}")


def per_task(value: str | Path | Mapping[str, str | Path], tasks: Sequence[str], flag: str) -> list[Path]:
    """One folder per task from a single folder (for every task) or a {task: folder} mapping (every task)."""
    if not isinstance(value, Mapping):
        return [Path(value)] * len(tasks)
    check_known(flag, value, tasks)
    missing = [t for t in tasks if t not in value]
    if missing:
        raise OnnxZipError(f"{flag} gives no folder for task(s) {', '.join(missing)}")
    return [Path(value[t]) for t in tasks]


def some_tasks(value: Mapping[str, str | Path] | None, tasks: Sequence[str], flag: str) -> dict[str, Path]:
    """Folders for some or all tasks (an --eval mapping); none given is an empty mapping."""
    if not value:
        return {}
    check_known(flag, value, tasks)
    return {t: Path(p) for t, p in value.items()}
