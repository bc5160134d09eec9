"""Canonicalisation of what exporters write: folding, bias Adds, flattening, heads, sparse layers."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxzip.api import merge
from onnxzip.canonical import import_network
from onnxzip.emit import task_model
from onnxzip.errors import OnnxZipError
from onnxzip.options import MergeOptions

TOL = 1e-5


def _run_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _graph_model(nodes, inits, in_shape, out_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *out_shape])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn_cnn(seed: int) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> BatchNorm -> Relu -> Gemm."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    pos = lambda n: (rng.random(n) + 0.5).astype(np.float32)
    inits = {"W1": f(5, 1, 3, 3), "b1": f(5), "g1": pos(5), "be1": f(5), "m1": f(5), "v1": pos(5),
             "W2": f(7, 5), "b2": f(7), "g2": pos(7), "be2": f(7), "m2": f(7), "v2": pos(7), "W3": f(3, 7)}
    nodes = [helper.make_node("Conv", ["input", "W1", "b1"], ["c"], name="conv", kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                              strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "g1", "be1", "m1", "v1"], ["bn"], name="bn1", epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "W2", "b2"], ["g"], name="fc", transB=1),
             helper.make_node("BatchNormalization", ["g", "g2", "be2", "m2", "v2"], ["bn2"], name="bn2"),
             helper.make_node("Relu", ["bn2"], ["r2"], name="relu2"),
             helper.make_node("Dropout", ["r2"], ["d2"], name="drop"),
             helper.make_node("Gemm", ["d2", "W3"], ["logits"], name="head", transB=1)]
    return _graph_model(nodes, inits, (1, 9, 9), (3,))


def test_batchnorm_folding_is_exact(tmp_path):
    path = B.save(_bn_cnn(0), tmp_path / "bn.onnx")
    net = import_network(path)
    assert [type(s).__name__ for s in net.steps].count("Layer") == 3
    assert not any(getattr(s, "op_type", "") in ("BatchNormalization", "Dropout") for s in net.steps)
    x = np.random.default_rng(1).standard_normal((6, 1, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(_run_model(task_model(net), x), B.run(path, x)[0], rtol=TOL, atol=TOL)


def test_bias_as_separate_add_merges_with_gemm_form(tmp_path):
    layers = B.mlp_weights([64, 20, 12, 10], 4)
    permuted, perms = B.permute_hidden(layers, 2)
    a = B.save(B.mlp_model(layers, bias_as_add=True), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(permuted), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "c", (1, 8, 8), 200)
    result = merge([a, b], calib, tmp_path / "m.onnx")
    for lp, perm in zip(result.plan.layers, perms):
        np.testing.assert_array_equal(perm[np.array(lp.shared)[:, 1]], np.array(lp.shared)[:, 0])
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(B.run(tmp_path / "m.onnx", x)[1], B.run(a, x)[0], rtol=TOL, atol=TOL)


def _computed_flatten_cnn(layers) -> onnx.ModelProto:
    """The test CNN with Flatten replaced by Shape/Gather/Unsqueeze/Concat/Reshape and a Softmax head."""
    model = B.cnn_model(layers)
    nodes = [n for n in model.graph.node if n.op_type != "Flatten"]
    at = [i for i, n in enumerate(nodes) if n.name == "fc1"][0]
    chain = [helper.make_node("Shape", ["p2"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["p2", "target"], ["f"], name="reshape")]
    nodes = nodes[:at] + chain + nodes[at:]
    nodes[-1].output[0] = "z"
    nodes.append(helper.make_node("Softmax", ["z"], ["logits"], name="softmax", axis=-1))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inits.update(zero=np.array(0, np.int64), axes0=np.array([0], np.int64), minus1=np.array([-1], np.int64))
    return _graph_model(nodes, inits, (1, 12, 12), (10,))


def test_computed_reshape_flatten_and_softmax_head(tmp_path):
    layers = B.cnn_weights(3)
    permuted, _ = B.permute_hidden(layers, 5)
    a = B.save(_computed_flatten_cnn(layers), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(permuted), tmp_path / "b.onnx")
    net = import_network(a)
    assert [s.op_type for s in net.steps if hasattr(s, "op_type")][-1] == "Softmax"
    calib = B.calib_folder(tmp_path / "c", (1, 12, 12), 128)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(layout="gated"))
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    x = np.random.default_rng(0).random((5, 1, 12, 12), dtype=np.float32)
    y = B.run(tmp_path / "m.onnx", x, {"task": np.array(0, np.int64)})[0]
    np.testing.assert_allclose(y, B.run(a, x)[0], rtol=TOL, atol=TOL)


def test_unit_wise_ops_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"W1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "lo": np.array(0.1, np.float32),
             "W2": rng.standard_normal((6, 64)).astype(np.float32), "W3": rng.standard_normal((3, 6)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c", "lo"], ["cl"], name="clip"),
             helper.make_node("AveragePool", ["cl"], ["ap"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Identity", ["ap"], ["id"], name="ident"),
             helper.make_node("Flatten", ["id"], ["fl"], name="flat"),
             helper.make_node("MatMul", ["fl", "W2T"], ["mm"], name="mm"),
             helper.make_node("LeakyRelu", ["mm"], ["lr"], name="leaky", alpha=0.2),
             helper.make_node("Tanh", ["lr"], ["th"], name="tanh"),
             helper.make_node("Sigmoid", ["th"], ["sg"], name="sig"),
             helper.make_node("Gemm", ["sg", "W3"], ["z"], name="head", transB=1),
             helper.make_node("LogSoftmax", ["z"], ["logits"], name="lsm", axis=1)]
    inits["W2T"] = inits.pop("W2").T.copy()
    path = B.save(_graph_model(nodes, inits, (1, 10, 10), (3,)), tmp_path / "ops.onnx")
    net = import_network(path)
    assert [getattr(s, "op_type", s.__class__.__name__) for s in net.steps] == \
        ["Layer", "Clip", "AveragePool", "Flatten", "Layer", "LeakyRelu", "Tanh", "Sigmoid", "Layer", "LogSoftmax"]
    x = np.random.default_rng(1).standard_normal((3, 1, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(_run_model(task_model(net), x), B.run(path, x)[0], rtol=TOL, atol=TOL)


def test_sparse_pair_stays_sparse(tmp_path):
    rng = np.random.default_rng(0)
    models, pruned = [], []
    for seed in (1, 2):
        layers = B.mlp_weights([64, 40, 20, 10], seed)
        layers = [((W * (rng.random(W.shape) < 0.3)).astype(np.float32), b) for W, b in layers]
        pruned.append(layers)
        models.append(B.save(B.mlp_model(layers), tmp_path / f"{'ab'[seed - 1]}.onnx"))
    calib = B.calib_folder(tmp_path / "c", (1, 8, 8), 256)
    result = merge(models, calib, tmp_path / "m.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    for k, lp in enumerate(result.plan.layers[:-1]):
        W = inits[f"{lp.name}.shared.W"]
        for row, (i, j) in zip(W, lp.shared):
            nnz_a, nnz_b = (pruned[0][k][0][i] != 0).sum(), (pruned[1][k][0][j] != 0).sum()
            assert (row != 0).sum() <= max(nnz_a, nnz_b)
        assert np.mean(W == 0) >= 0.6
    # the heads are refit on their support only
    assert np.mean(inits["fc3.task_a.W_from_shared"] == 0) == pytest.approx(np.mean(pruned[0][2][0] == 0))


def test_unsupported_and_grouped_conv_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], name="my_conv", kernel_shape=[3, 3]),
             helper.make_node("Erf", ["c"], ["e"], name="my_erf"),
             helper.make_node("GlobalAveragePool", ["e"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    path = B.save(_graph_model(nodes, {"W": W}, (1, 6, 6), (4,)), tmp_path / "erf.onnx")
    with pytest.raises(OnnxZipError, match=r"erf\.onnx: node 'my_erf' \(Erf\) is not supported"):
        import_network(path)


def _conv_add_reshape_model(layers, opset: int, batch) -> onnx.ModelProto:
    """The test CNN with conv biases as separate Adds of [1,C,1,1] and Flatten as Reshape [0, -1]."""
    model = B.cnn_model(layers)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            bias = node.input.pop()
            inits[bias] = inits[bias].reshape(1, -1, 1, 1)
            out = node.output[0]
            node.output[0] = out + "_nobias"
            nodes += [node, helper.make_node("Add", [out + "_nobias", bias], [out], name=node.name + "_bias")]
        elif node.op_type == "Flatten":
            nodes.append(helper.make_node("Reshape", [node.input[0], "flat_shape"], node.output, name="reshape"))
        else:
            nodes.append(node)
    inits["flat_shape"] = np.array([0, -1], np.int64)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(out, full_check=True)
    return out


def test_mixed_opsets_bias_adds_constant_reshape_and_fixed_batch(tmp_path):
    layers = B.cnn_weights(2)
    permuted, perms = B.permute_hidden(layers, 4)
    a = B.save(_conv_add_reshape_model(layers, 13, 1), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(permuted), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "c", (1, 12, 12), 128)
    result = merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(batch_size=32))
    for lp, perm in zip(result.plan.layers, perms):
        np.testing.assert_array_equal(perm[np.array(lp.shared)[:, 1]], np.array(lp.shared)[:, 0])
    merged = onnx.load(str(tmp_path / "m.onnx"))
    assert merged.opset_import[0].version == B.OPSET and merged.ir_version == 8
    x = np.random.default_rng(0).random((1, 1, 12, 12), dtype=np.float32)
    np.testing.assert_allclose(B.run(tmp_path / "m.onnx", np.repeat(x, 3, 0))[0][:1], B.run(a, x)[0],
                               rtol=TOL, atol=TOL)


def test_different_input_shapes_are_refused(tmp_path):
    a = B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([49, 16, 10], 1), in_shape=(1, 7, 7)), tmp_path / "b.onnx")
    with pytest.raises(OnnxZipError, match=r"b\.onnx: (reads )?input 'input'"):
        merge([a, b], B.calib_folder(tmp_path / "c", (1, 8, 8), 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ReduceMean over the spatial axes is a global average pool, as torch's exporters write it.

class _PooledCNN:
    """conv-relu-conv-relu-global average pool-fc in torch: AdaptiveAvgPool2d(1) + flatten, or x.mean([2, 3])."""

    SHAPE, C1, C2, CLASSES = (1, 8, 8), 6, 8, 5

    @staticmethod
    def module(seed: int, mean: bool):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(seed)
                C = _PooledCNN
                self.c1 = torch.nn.Conv2d(1, C.C1, 3, padding=1)
                self.c2 = torch.nn.Conv2d(C.C1, C.C2, 3, padding=1)
                self.fc = torch.nn.Linear(C.C2, C.CLASSES)
                self.pool = torch.nn.AdaptiveAvgPool2d(1)

            def forward(self, x):
                x = torch.relu(self.c2(torch.relu(self.c1(x))))
                return self.fc(x.mean([2, 3]) if mean else torch.flatten(self.pool(x), 1))
        return Net().eval()

    @staticmethod
    def permuted(net, seed: int):
        import torch
        rng = np.random.default_rng(seed)
        p1, p2 = (torch.from_numpy(rng.permutation(n)) for n in (_PooledCNN.C1, _PooledCNN.C2))
        with torch.no_grad():
            net.c1.weight.copy_(net.c1.weight[p1]), net.c1.bias.copy_(net.c1.bias[p1])
            net.c2.weight.copy_(net.c2.weight[p2][:, p1]), net.c2.bias.copy_(net.c2.bias[p2])
            net.fc.weight.copy_(net.fc.weight[:, p2])
        return net

    @staticmethod
    def export(net, path, dynamo: bool, opset: int):
        return B.export_torch(net, path, dynamo, opset, _PooledCNN.SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("mean", [False, True], ids=["adaptive_pool", "mean"])
@pytest.mark.parametrize("dynamo,opset", [(True, 18), (True, 20), (False, 11), (False, 17)])
def test_reduce_mean_over_the_spatial_axes_is_a_global_average_pool(tmp_path, mean, dynamo, opset):
    pytest.importorskip("torch")
    C = _PooledCNN
    a = C.export(C.module(0, mean), tmp_path / "a.onnx", dynamo, opset)
    b = C.export(C.permuted(C.module(0, mean), 1), tmp_path / "b.onnx", dynamo, opset)
    ops = {n.op_type for n in onnx.load(str(a)).graph.node}
    net = import_network(a)
    assert "GlobalAveragePool" in [getattr(s, "op_type", None) for s in net.steps]
    assert [layer.name for layer in net.layers] == ["conv1", "conv2", "fc1"]
    assert "ReduceMean" in ops or "GlobalAveragePool" in ops  # as the exporter wrote it
    result, _ = B.merge_copies_back(tmp_path, [a, b], C.SHAPE)
    assert [lp.n_shared for lp in result.plan.layers] == [C.C1, C.C2, 0]


@pytest.mark.parametrize("axes,keepdims,features,why", [((1,), 1, 64, r"axes \[1\]"),
                                                        ((2,), 0, 32, r"axes \[2\]"),
                                                        ((1, 2, 3), 0, 1, r"axes \[1, 2, 3\]")])
def test_other_reductions_are_refused_by_name(tmp_path, axes, keepdims, features, why):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ReduceMean", ["r1"], ["m"], name="odd_mean", axes=list(axes), keepdims=keepdims),
             helper.make_node("Flatten", ["m"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1)]
    inits = {"W1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
             "W2": rng.standard_normal((3, features)).astype(np.float32)}
    path = B.save(B.graph_model(nodes, inits, (1, 8, 8), (3,), opset=13), tmp_path / "odd.onnx")
    with pytest.raises(OnnxZipError, match=rf"odd_mean.*ReduceMean.*reduces {why}"):
        import_network(path)


def test_errors_name_layers_by_onnxzips_names_and_unnamed_nodes_by_their_type(tmp_path):
    layers = B.mlp_weights([64, 16, 10], 0)
    layers[1][0][0, 0] = np.nan
    model = B.mlp_model(layers)
    for node in model.graph.node:
        node.name = ""
    path = B.save(model, tmp_path / "unnamed.onnx")
    with pytest.raises(OnnxZipError, match=r"layer 'fc2' has non-finite weights"):
        import_network(path)
    net = import_network(B.save(B.mlp_model(B.mlp_weights([64, 16, 10], 0)), tmp_path / "named.onnx"))
    assert net.layers[0].describe() == "'fc1' (node 'gemm0')"
    relu = next(s for s in net.steps if getattr(s, "op_type", None) == "Relu")
    assert relu.describe() == "'relu0' (Relu)"
    assert replace(relu, source="").describe() == "an unnamed Relu node"


# A model with a debug output beside the task's: --task-output picks the task's, the rest is dropped.

def _two_output_export(path, seed: int, perm, dynamo: bool):
    import warnings
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.fc1, self.fc2 = torch.nn.Linear(16, 12), torch.nn.Linear(12, 5)

        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            return h.mean(1, keepdim=True), self.fc2(h)  # the debug output first

    net = Net().eval()
    p = torch.from_numpy(perm)
    with torch.no_grad():
        net.fc1.weight.copy_(net.fc1.weight[p]), net.fc1.bias.copy_(net.fc1.bias[p])
        net.fc2.weight.copy_(net.fc2.weight[:, p])
    x = torch.randn(2, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["debug", "logits"], dynamic_shapes={"x": {0: torch.export.Dim("N")}})
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=13, input_names=["input"],
                              output_names=["debug", "logits"], dynamic_axes={"input": {0: "N"}})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
def test_task_output_picks_the_output_of_a_model_with_several(tmp_path, dynamo):
    pytest.importorskip("torch")
    a = _two_output_export(tmp_path / "a.onnx", 0, np.arange(12), dynamo)
    b = _two_output_export(tmp_path / "b.onnx", 0, np.random.default_rng(1).permutation(12), dynamo)
    calib = B.calib_folder(tmp_path / "calib", (1, 4, 4), 64)
    out = tmp_path / "m.onnx"
    with pytest.raises(OnnxZipError, match=r"a\.onnx: has 2 outputs \(debug, logits\).*--task-output"):
        merge([a, b], calib, out)
    with pytest.raises(OnnxZipError, match=r"--task-output names output 'logit'"):
        merge([a, b], calib, out, MergeOptions(task_outputs=(("a", "logit"), ("b", "logits"))))
    result = merge([a, b], calib, out, MergeOptions(task_outputs=(("a", "logits"), ("b", "logits"))))
    assert [c.top1_agreement for c in result.checks] == [1.0, 1.0]
    x = np.random.default_rng(2).random((8, 1, 4, 4), dtype=np.float32)
    want = B.run(a, x)[1]  # the logits, the second output
    for y in B.run(out, x):
        np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL)
