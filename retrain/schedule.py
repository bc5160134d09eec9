"""The paper's schedule (MTZ Algorithm 1, line 10): retrain the partially merged model after each zipped layer.

`onnxzip merge --retrain-iters N` hands a LayerRetrainer to the zipper. After a hidden layer is
zipped, it writes the merged model of the plan so far (later layers not yet shared), retrains it
with retrain() (sharing kept, written back by initializer name, checked against ONNX Runtime),
and reads the trained initializers back into the tied networks, from which zipping continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..emit import merged_model, tied_from_weights
from ..format import MULTI
from ..ir import Network
from ..plan import SharingPlan
from ..scratch import scratch_dir
from ..progress import ProgressFn, no_progress
from .api import retrain
from .options import RetrainOptions
from .progress import StepFn

PARTIAL_LAYOUT = MULTI


@dataclass(frozen=True)
class LayerRetrain:
    """One retraining round of the schedule: after which layer, and each task's fidelity before and after."""

    after_layer: str
    iterations: int
    tasks: tuple[str, ...]
    fidelity_before: tuple[float, ...]
    fidelity_after: tuple[float, ...]
    accuracy_before: tuple[float | None, ...]
    accuracy_after: tuple[float | None, ...]
    loss_final: float
    seconds: float


def _last_shared(plan: SharingPlan) -> str:
    return [l.name for l in plan.layers if l.n_shared][-1]


class LayerRetrainer:
    """The zipper's after-layer hook that retrains; ``rounds`` collects what each round measured."""

    def __init__(self, nets: Sequence[Network], data: Sequence[Path], options: RetrainOptions,
                 metadata: Callable[[SharingPlan], dict[str, str]], progress: ProgressFn = no_progress):
        self.nets, self.data, self.options = list(nets), list(data), options
        self.metadata, self.progress = metadata, progress
        self.rounds: list[LayerRetrain] = []

    def _bars(self, layer: str) -> Callable[[str, int, str], StepFn]:
        def bars(label: str, total: int, unit: str = "") -> StepFn:
            tick = self.progress(f"retrain {layer} {label}", total, unit)
            return lambda figures: tick()
        return bars

    def __call__(self, plan: SharingPlan, tied: list[Network]) -> list[Network]:
        """Retrain the merged model of ``plan`` and ``tied``; the tied networks with the trained weights."""
        start, layer = time.perf_counter(), _last_shared(plan)
        with scratch_dir("onnxzip-retrain-") as tmp:
            partial, out = Path(tmp) / "partial.onnx", Path(tmp) / "retrained.onnx"
            onnx.save(merged_model(plan, tied, PARTIAL_LAYOUT, self.metadata(plan)), str(partial))
            result = retrain(partial, dict(zip(plan.tasks, self.data)), out, self.options,
                             teachers={t: n.path for t, n in zip(plan.tasks, self.nets)},
                             progress=self._bars(layer))
            values = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
        rows = result.tasks
        self.rounds.append(LayerRetrain(layer, result.iterations, plan.tasks,
                                        tuple(r.fidelity_before for r in rows), tuple(r.fidelity_after for r in rows),
                                        tuple(r.accuracy_before for r in rows), tuple(r.accuracy_after for r in rows),
                                        result.loss_final, time.perf_counter() - start))
        return tied_from_weights(plan, tied, {k: v.astype(np.float32) for k, v in values.items()})
