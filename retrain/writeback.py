"""Write trained values into the merged model's initializers by name, then prove the file equals the module.

No re-export: the graph, names, metadata and sharing of the merged model stay as they are; only
the values of its weight initializers change, so a shared block cannot silently become two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..format import KEY_RETRAIN, meta_key
from ..errors import OnnxZipError
from ..save import save_atomically
from ..verify import VERIFY_ATOL, VERIFY_RTOL, MergedRunner, output_gap

# The written model (ONNX Runtime) and the torch module may differ by float reassociation only,
# with the tolerance of every written model (verify.output_gap).
WRITEBACK_RTOL, WRITEBACK_ATOL = VERIFY_RTOL, VERIFY_ATOL
RETRAIN_KEY = meta_key(KEY_RETRAIN)


def with_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold those values (same shape and dtype)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = {t.name: t for t in out.graph.initializer}
    for name, value in values.items():
        init = index.get(name)
        if init is None:
            raise ValueError(f"internal error: the merged model has no initializer '{name}'")
        old = numpy_helper.to_array(init)
        if value.shape != old.shape:
            raise ValueError(f"internal error: '{name}' changed shape from {old.shape} to {value.shape}")
        if not np.isfinite(value).all():
            raise OnnxZipError(f"retraining made initializer '{name}' non-finite; nothing was written; "
                               "try a lower --lr")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=old.dtype), name))
    return out


def add_record(model: onnx.ModelProto, record: dict) -> None:
    """Append ``record`` to the model's list of retraining runs (metadata format.KEY_RETRAIN), in place."""
    entry = next((p for p in model.metadata_props if p.key == RETRAIN_KEY), None)
    if entry is None:
        entry = model.metadata_props.add(key=RETRAIN_KEY, value="[]")
    entry.value = json.dumps(json.loads(entry.value) + [record])


def check_written(path: Path, tasks: Sequence[str], layout: str, inputs: Mapping[str, np.ndarray],
                  expected: Mapping[str, np.ndarray], providers: list[str],
                  problem: str = "the written model differs from the retrained module") -> dict[str, float]:
    """Largest |ONNX Runtime on ``path`` - torch| per task on ``inputs``; OnnxZipError naming ``problem``
    if any exceeds the tolerance."""
    runner = MergedRunner(path, tasks, layout, providers)
    diffs = {}
    for t, task in enumerate(tasks):
        y, ref = runner(t, inputs[task]), expected[task]
        diff, bound, ok = output_gap(y, ref)
        if not ok:
            raise OnnxZipError(f"task '{task}': {problem} by {diff:.3g} "
                               f"(allowed {bound:.3g}); nothing was written")
        diffs[task] = diff
    return diffs


def write_back(model: onnx.ModelProto, values: Mapping[str, np.ndarray], record: dict, output: Path,
               tasks: Sequence[str], layout: str, inputs: Mapping[str, np.ndarray],
               expected: Mapping[str, np.ndarray], providers: list[str]) -> dict[str, float]:
    """Write the retrained model to ``output`` atomically, only once ONNX Runtime reproduces ``expected``.

    Returns the largest |written - torch| per task; on any problem nothing is left at ``output``.
    """
    written = with_values(model, values)
    add_record(written, record)
    diffs: dict[str, float] = {}
    save_atomically(written, output,
                    lambda tmp: diffs.update(check_written(tmp, tasks, layout, inputs, expected, providers)))
    return diffs
