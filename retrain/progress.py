"""How retraining reports progress: per stage a step function that takes the current figures."""

from __future__ import annotations

from typing import Callable, Mapping

# step(figures): one unit of work done; figures maps "loss" and task names to the latest values.
StepFn = Callable[[Mapping[str, float]], None]
# progress(stage label, total, unit) -> step function for that stage (unit: what is counted).
RetrainProgressFn = Callable[[str, int, str], StepFn]
UNIT_ITERATIONS, UNIT_TASKS, UNIT_STEPS = "iterations", "tasks", "steps"


def no_progress(label: str, total: int, unit: str = "") -> StepFn:
    """A progress reporter that reports nothing."""
    return lambda figures: None
