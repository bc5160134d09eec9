"""The zipper's own machinery (onnxzip/zipper.py): the caches of live tensors between layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper

import builders as B
from onnxzip import zipper
from onnxzip.api import merge
from onnxzip.options import MergeOptions


def test_caches_in_memory_and_on_disk_give_the_same_merge(tmp_path, monkeypatch):
    """Live tensors held in memory or written to disk between layers: bit-identical merged weights and plan."""
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 12, 12), n=96)
    written = []
    save = np.save
    monkeypatch.setattr(np, "save", lambda path, *args, **kw: (written.append(path), save(path, *args, **kw))[1])

    def merged(name):
        result = merge([a, b], calib, tmp_path / f"{name}.onnx", MergeOptions(share=0.5, batch_size=32))
        model = onnx.load(tmp_path / f"{name}.onnx")
        return result.plan, {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    plan_memory, weights_memory = merged("memory")
    assert not [p for p in written if "onnxzip-" in str(p)]  # nothing of the caches went to disk
    monkeypatch.setattr(zipper, "CACHE_MEMORY_FRACTION", 0.0)
    plan_disk, weights_disk = merged("disk")
    assert [p for p in written if "onnxzip-" in str(p)]
    assert [lp.shared for lp in plan_memory.layers] == [lp.shared for lp in plan_disk.layers]
    assert weights_memory.keys() == weights_disk.keys()
    for name, w in weights_memory.items():
        assert np.array_equal(w, weights_disk[name]), name

