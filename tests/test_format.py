"""The merged file's contract lives in onnxzip.format: what a merge writes is named there, and no
other module spells a metadata key or a fixed name of the merged file."""

import json
import re
from pathlib import Path

import onnx

import builders as B
from onnxzip import format as F, skeleton
from onnxzip.api import merge
from onnxzip.options import MergeOptions

REPO = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("onnxzip", "retrain", "cli") for p in (REPO / folder).rglob("*.py")]
# Literals that belong to the contract: metadata keys and the fixed prefixes of helper tensors.
CONTRACT = re.compile(r"""["'](onnxzip\.[a-z_]+|const\.|live\.)""")


def test_only_format_spells_the_contract():
    spelled = {p.relative_to(REPO).as_posix(): CONTRACT.findall(p.read_text()) for p in SOURCES
               if p.name != "format.py"}
    assert not {k: v for k, v in spelled.items() if v}


def test_a_merge_writes_what_format_names(tmp_path):
    a = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 1)), tmp_path / "b.onnx")
    out = tmp_path / "m.onnx"
    result = merge([a, b], B.calib_folder(tmp_path / "c", (1, 8, 8), 48), out, MergeOptions(layout=F.GATED))
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    keys = (F.KEY_VERSION, F.KEY_TASKS, F.KEY_SOURCES, F.KEY_LAYOUT, F.KEY_SHARING, F.KEY_PLAN, F.KEY_NETWORKS)
    assert sorted(meta) == sorted(F.meta_key(k) for k in keys)
    networks = skeleton.unpack(meta[F.meta_key(F.KEY_NETWORKS)])
    assert list(networks) == ["a", "b"] and networks["a"]["file"] == "a.onnx" and "/" not in json.dumps(networks["a"]["file"])
    assert json.loads(meta[F.meta_key(F.KEY_TASKS)]) == ["a", "b"] and meta[F.meta_key(F.KEY_LAYOUT)] == F.GATED
    inits = {t.name for t in model.graph.initializer}
    assert {F.task_index_name(0), F.task_index_name(1), F.TASK_PROBE} <= inits
    assert [i.name for i in model.graph.input][-1] == F.TASK_INPUT
    assert [o.name for o in model.graph.output] == [F.GATED_OUTPUT]
    helpers = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer
                  if t.name.startswith(F.CONST_PREFIX))
    total = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer)
    assert helpers > 0 and F.weight_params(model) == total - helpers == result.params_merged
