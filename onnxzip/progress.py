"""How the merge reports progress: per stage a tick function, and the names of what stages count."""

from __future__ import annotations

from typing import Callable

# progress(stage label, total, unit) -> tick: one unit of the stage done. The unit names what is counted
# ("batches", "tasks"), for the bar beside its count.
ProgressFn = Callable[[str, int, str], Callable[[], None]]
# What the stages count.
UNIT_BATCHES, UNIT_TASKS, UNIT_STEPS, UNIT_MODELS = "batches", "tasks", "steps", "models"


def no_progress(label: str, total: int, unit: str = "") -> Callable[[], None]:
    """A progress reporter that reports nothing."""
    return lambda: None
