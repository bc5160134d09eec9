"""Sharing what aligns (onnxzip/align.py): models of different depths, or whose fc1 sees another
spatial size, share their aligned layers and keep the rest as their own; only models whose very first
layers cannot share are refused, naming the layer and how it differs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import builders as B
from onnxzip.align import align, slots
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.merged import inspect
from onnxzip.options import MergeOptions
from onnxzip.plan import NOT_A_MEMBER

SHAPE = (1, 12, 12)
TOL = 1e-4
SAMPLES = 64


def _cnn(seed: int, fcs: tuple[int, ...], convs=None, pad: int = 1) -> tuple[list, object]:
    """conv-conv-fc..., the convs given (or random), FC widths ``fcs`` (the last is the head)."""
    rng = np.random.default_rng(seed)
    convs = convs or B.cnn_weights(seed)[:2]
    spatial = ((12 + 2 * pad - 2) // 2 - 2) // 2
    widths = [convs[1][0].shape[0] * spatial * spatial, *fcs]
    fc = [((rng.standard_normal((o, i)) * np.sqrt(2 / i)).astype(np.float32),
           (0.1 * rng.standard_normal(o)).astype(np.float32)) for i, o in zip(widths[:-1], widths[1:])]
    layers = list(convs) + fc
    return layers, B.exporter_model(layers, SHAPE, B.ExportForm(conv_pad=pad))


def _permuted_convs(seed: int) -> tuple[list, list]:
    convs = B.cnn_weights(seed)[:2]
    (W1, b1), (W2, b2) = convs
    p1, p2 = np.random.default_rng(seed + 1).permutation(len(W1)), np.random.default_rng(seed + 2).permutation(len(W2))
    return convs, [(W1[p1], b1[p1]), (W2[p2][:, p1], b2[p2])]


def _merge(tmp_path, models, **options):
    paths = [B.save(m, tmp_path / f"{chr(97 + i)}.onnx") for i, m in enumerate(models)]
    out = tmp_path / "m.onnx"
    result = merge(paths, B.calib_folder(tmp_path / "c", SHAPE, SAMPLES), out, MergeOptions(**options))
    assert all(c.max_diff_vs_tied <= TOL for c in result.checks)  # emitted == tied, every task
    return paths, out, result


@pytest.mark.parametrize("layout", ["multi", "gated"])
def test_a_four_and_a_five_layer_cnn_share_their_convs_and_keep_the_rest(tmp_path, layout):
    convs, permuted = _permuted_convs(0)
    _, a = _cnn(0, (24, 10), convs)
    _, b = _cnn(5, (20, 16, 7), permuted)
    paths, out, result = _merge(tmp_path, [a, b], share_layers=(("fc1", 0),), layout=layout)
    plan = result.plan
    assert [lp.name for lp in plan.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert [lp.units for lp in plan.layers] == [(6, 6), (8, 8), (24, 20), (10, 16), (0, 7)]
    assert [lp.n_shared for lp in plan.layers] == [6, 8, 0, 0, 0]  # the permuted convs found exactly
    assert max(lp.rel_error[0] for lp in plan.layers[3:]) < 1e-5  # exact so far: nothing to correct
    assert "a.onnx: layer 'fc2' (node 'gemm10') is its head (4 layers against 5)" in result.alignment
    x = np.random.default_rng(3).random((8, *SHAPE)).astype(np.float32)
    for t, path in enumerate(paths):  # nothing shared past the convs, which are exact: the originals
        np.testing.assert_allclose(B.task_output(out, x, layout, t), B.run(path, x)[0], rtol=TOL, atol=TOL)


def test_a_shared_fc1_is_corrected_in_each_task_s_own_layers_after_it(tmp_path):
    convs, permuted = _permuted_convs(0)
    _, a = _cnn(0, (24, 10), convs)
    _, b = _cnn(5, (20, 16, 7), permuted)
    _, _, result = _merge(tmp_path, [a, b])
    plan = result.plan
    assert [lp.n_shared for lp in plan.layers] == [6, 8, 20, 0, 0]
    assert all(lp.corrected for lp in plan.layers[3:]) and plan.layers[4].rel_error[0] == 0.0
    assert plan.layers[3].rel_error[0] > 0.0 and plan.layers[4].rel_error[1] > 0.0


def test_fc1_on_another_spatial_size_stops_the_sharing_before_it(tmp_path):
    convs, permuted = _permuted_convs(1)
    _, a = _cnn(0, (24, 10), convs, pad=1)
    _, b = _cnn(2, (24, 10), permuted, pad=0)
    _, out, result = _merge(tmp_path, [a, b])
    assert [lp.n_shared for lp in result.plan.layers] == [6, 8, 0, 0]
    assert "b.onnx: layer 'fc1'" in result.alignment and "(different spatial sizes)" in result.alignment


def test_each_added_model_aligns_as_far_as_it_can(tmp_path):
    """Three models: b aligns with a up to fc1, c (fc1 on another spatial size) only up to conv2. The
    convs are shared by all three, fc1 by a and b; c's fc1 and every head are their own."""
    convs, permuted = _permuted_convs(2)
    models = [_cnn(0, (24, 10), convs)[1], _cnn(1, (20, 16, 7), permuted)[1], _cnn(4, (24, 10), permuted, pad=0)[1]]
    nets = [import_network(B.save(m, tmp_path / f"n{i}.onnx")) for i, m in enumerate(models)]
    alignment = align(nets)
    assert alignment.depths == (3, 3, 2) and "n2.onnx: layer 'fc1'" in alignment.stop
    assert [s[2] for s in slots(nets)][-1] == (0, 7, 0)
    paths, out, result = _merge(tmp_path, models)
    plan = result.plan
    assert [lp.n_shared for lp in plan.layers] == [6, 8, 20, 0, 0]
    assert [sorted(lp.members) for lp in plan.layers[:3]] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    assert all(s[2] == NOT_A_MEMBER for s in plan.layers[2].shared) and plan.layers[2].own_units(2).size == 24
    assert all(e > 0 for e in plan.layers[2].rel_error)  # c's own fc1 corrected and reported too
    model = onnx.load(str(out))
    names = {t.name for t in model.graph.initializer}
    assert "fc1.task_a_b.W_from_shared" in names and "fc1.task_c.W_from_shared" in names
    assert inspect(out).plan == plan  # the metadata round-trips, members included
    per_task = [r.params_saved for r in result.layers]
    assert per_task[2] == 20 * (8 * 4 + 1)  # one copy of a and b's shared fc1 block saved (8 channels x 2x2)


def test_models_whose_first_layers_differ_are_refused_naming_them(tmp_path):
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([144, 16, 10], 1), in_shape=SHAPE), tmp_path / "b.onnx")
    with pytest.raises(OnnxZipError, match=r"b\.onnx: layer 'fc1' \(node 'gemm0'\) is fc, but \S*a\.onnx's 'conv1' "
                                           r"is conv; the first layers must align to share anything"):
        merge([a, b], B.calib_folder(tmp_path / "c", SHAPE, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_budget_search_refuses_models_that_align_in_part(tmp_path):
    convs, permuted = _permuted_convs(0)
    a = B.save(_cnn(0, (24, 10), convs)[1], tmp_path / "a.onnx")
    b = B.save(_cnn(5, (20, 16, 7), permuted)[1], tmp_path / "b.onnx")
    with pytest.raises(OnnxZipError, match=r"--target-size needs models whose hidden layers all align, but these "
                                           r"align up to layer fc1 only"):
        merge([a, b], B.calib_folder(tmp_path / "c", SHAPE, 16), tmp_path / "m.onnx",
              MergeOptions(target_size="0.5"))


@pytest.mark.slow
def test_channel_ops_that_differ_stop_the_alignment_before_their_space(tmp_path):
    """A PRelu after the stem in one model where the other has none: the stem's space (a residual
    stream) cannot share, so nothing aligns, and the refusal names the channel ops."""
    pytest.importorskip("torch")
    from torch_blocks import MobileBlocks
    a = B.export_torch(MobileBlocks("relu6"), tmp_path / "a.onnx", True, 18, B.MOBILE_SHAPE)
    b = B.export_torch(MobileBlocks("prelu"), tmp_path / "b.onnx", True, 18, B.MOBILE_SHAPE)
    with pytest.raises(OnnxZipError, match=r"b\.onnx: the depthwise convolutions and PRelus after layer 'conv1'.*"
                                           r"\('prelu1'.*\) differ from .*a\.onnx's \(none\)"):
        align([import_network(a), import_network(b)])


def test_a_grouped_conv_that_differs_stops_the_alignment_before_the_units_it_reads(tmp_path):
    """gconv with 2 groups in one model, 4 in the other: the conv before it (whose units it reads in groups)
    cannot share either; the stem still does, and the merge is exact for each task."""
    torch = pytest.importorskip("torch")

    class Chain(torch.nn.Module):
        def __init__(self, groups: int):
            super().__init__()
            torch.manual_seed(groups)
            self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, padding=1)
            self.g, self.fc = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.g(torch.relu(self.c2(torch.relu(self.c1(x))))))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))

    paths = [B.export_torch(Chain(g), tmp_path / f"g{g}.onnx", True, 18, SHAPE) for g in (2, 4)]
    found = align([import_network(p) for p in paths])
    assert found.depths == (1, 1)
    assert "has 4 groups over 8 -> 8 channels, but" in found.stop
    assert "layer 'gconv1' (node" in found.stop and "is a grouped convolution reading the units of 'conv2'" in found.stop
    result = merge(paths, B.calib_folder(tmp_path / "c", SHAPE, SAMPLES), tmp_path / "m.onnx", MergeOptions())
    assert [lp.n_shared for lp in result.plan.layers] == [4, 0, 0, 0]
    assert all(c.max_diff_vs_tied < TOL for c in result.checks)
