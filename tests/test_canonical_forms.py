"""Forms that real exporters write, imported into the canonical network (onnxzip.canonical).

A per-channel affine after an activation (BatchNorm2d/BatchNorm1d after ReLU, Mul/Add/Sub/Div by
constants) folded forward into the next layer; Squeeze after a global pool; computed flattening
shapes with a dynamic batch; MatMul on [N, 1, F]; a reshape of the input to an image; opsets 9 to
21; SiLU, squeeze-and-excitation gates and HardSwish (elementwise Mul joins); depthwise convolutions
and PRelu (channel ops) in inverted residual blocks. The torch forms are exported in the tests by both
exporters (TorchScript, dynamo), imported as
they are, emitted by onnxzip and compared with ONNX Runtime on the file; where the form changes
the weights, a merge with a unit-permuted copy must find the permutation and reproduce the model.
The refusals are hand-built graphs, each refused with one line naming the file and the node.
"""


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import builders as B
from onnxzip.api import merge
from onnxzip.budget import free_spaces, merged_params
from onnxzip.canonical import import_network
from onnxzip.emit import task_model
from onnxzip.errors import OnnxZipError
from onnxzip.ir import DEPTHWISE, PRELU, Layer
from onnxzip.options import MergeOptions
from onnxzip.spaces import unit_spaces

torch = pytest.importorskip("torch")
from torch_blocks import GroupedBlocks, MobileBlocks, SEBlock, permute_bn, randomise  # noqa: E402  (needs torch)

# Affines folded into float32 weights (forward and backward): a few float32 ulps of the outputs.
FOLD_TOL = 1e-4
# Forms that change no weight: float reassociation only.
TOL = 1e-5
SHAPE = (1, 8, 8)
# (dynamo, opset): TorchScript with Squeeze/Unsqueeze axes as attributes (11) and as inputs (17),
# the dynamo exporter at its default opset and a newer one.
EXPORTERS = [(False, 11), (False, 17), (True, 18), (True, 20)]
# One of each exporter, for the forms whose opset does not matter beyond that.
ONE_EACH = [(False, 11), (True, 18)]
EXPORTER_IDS = [f"{'dynamo' if d else 'torchscript'}{o}" for d, o in EXPORTERS]
ONE_EACH_IDS = [f"{'dynamo' if d else 'torchscript'}{o}" for d, o in ONE_EACH]


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _export(module, path, dynamo: bool, opset: int, shape=SHAPE):
    """The module exported in eval mode with a dynamic batch axis, input named 'input'."""
    return B.export_torch(module, path, dynamo, opset, shape)


def _reproduces(path, shape=SHAPE, tol: float = FOLD_TOL, batches=(5,)):
    """Import the file as it is; the canonical network, emitted by onnxzip, computes what ONNX Runtime
    computes on the file (relative tolerance ``tol``). Returns the network."""
    net = import_network(path)
    for n in batches:
        x = np.random.default_rng(n).standard_normal((n, *shape)).astype(np.float32)
        want = B.run(path, x)[0]
        got = _ort(task_model(net), x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))
    return net


def _op_types(net) -> list[str]:
    return [s.kind if isinstance(s, Layer) else s.op_type for s in net.steps]


def _assert_pairs(plan, perms) -> None:
    """Every hidden layer fully shared, unit i of the copy paired with the unit it came from."""
    for lp, perm in zip(plan.layers, perms):
        pairs = np.array(lp.shared)
        assert pairs.shape == (len(perm), 2)
        np.testing.assert_array_equal(perm[pairs[:, 1]], pairs[:, 0])
    assert plan.layers[-1].n_shared == 0


def _permute_units(layer, perm, bn=None, reader=None, rep: int = 1) -> None:
    """Permute a layer's output units (and its BatchNorm's channels, and the columns of the layer
    reading them, ``rep`` consecutive columns per unit): the network computes the same function."""
    p = torch.from_numpy(perm)
    with torch.no_grad():
        layer.weight.copy_(layer.weight[p])
        layer.bias.copy_(layer.bias[p])
        if bn is not None:
            permute_bn(bn, p)
        if reader is not None:
            w = reader.weight
            cols = torch.from_numpy((perm[:, None] * rep + np.arange(rep)[None, :]).reshape(-1))
            w.copy_(w[:, cols] if w.ndim == 2 else w[:, p])


class _Exports:
    """Exported models, cached for the module: each (form, exporter, copy) is exported once."""

    def __init__(self, folder):
        self.folder, self.cache = folder, {}

    def get(self, make, key: str, dynamo: bool, opset: int, shape=SHAPE, seed: int | None = None):
        """The file of make(seed) (seed None: the original, else a permuted copy) and the permutations."""
        name = f"{key}_{'dyn' if dynamo else 'ts'}{opset}_{'orig' if seed is None else seed}"
        if name not in self.cache:
            module, perms = make(seed)
            self.cache[name] = (_export(module, self.folder / f"{name}.onnx", dynamo, opset, shape), perms)
        return self.cache[name]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return _Exports(tmp_path_factory.mktemp("exports"))


# 1. A per-channel affine after an activation folds forward into the next layer


class _BNAfterReLU(torch.nn.Module):
    """conv(pad 1)-relu-BN2d-conv(unpadded)-relu-BN2d-flatten-fc-relu-BN1d-fc: every BatchNorm after
    its activation, so each folds into the layer after it (the second through the flattening)."""

    C1, C2, SPATIAL, H, CLASSES = 4, 6, 6, 10, 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        C = _BNAfterReLU
        self.c1, self.bn1 = torch.nn.Conv2d(1, C.C1, 3, padding=1), torch.nn.BatchNorm2d(C.C1)
        self.c2, self.bn2 = torch.nn.Conv2d(C.C1, C.C2, 3), torch.nn.BatchNorm2d(C.C2)
        self.f1, self.bn3 = torch.nn.Linear(C.C2 * C.SPATIAL ** 2, C.H), torch.nn.BatchNorm1d(C.H)
        self.f2 = torch.nn.Linear(C.H, C.CLASSES)
        for i, bn in enumerate((self.bn1, self.bn2, self.bn3)):
            randomise(bn, i)

    def forward(self, x):
        x = self.bn1(torch.relu(self.c1(x)))
        x = self.bn2(torch.relu(self.c2(x)))
        x = self.bn3(torch.relu(self.f1(torch.flatten(x, 1))))
        return self.f2(x)

    @staticmethod
    def make(seed):
        net, C = _BNAfterReLU(), _BNAfterReLU
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(n) for n in (C.C1, C.C2, C.H)]
        _permute_units(net.c1, perms[0], net.bn1, net.c2)
        _permute_units(net.c2, perms[1], net.bn2, net.f1, rep=C.SPATIAL ** 2)
        _permute_units(net.f1, perms[2], net.bn3, net.f2)
        return net, perms


@pytest.mark.slow
@pytest.mark.parametrize("dynamo, opset", EXPORTERS, ids=EXPORTER_IDS)
def test_batchnorm_after_relu_folds_into_the_next_layer(tmp_path, exports, dynamo, opset):
    C = _BNAfterReLU
    a, _ = exports.get(C.make, "bn_after_relu", dynamo, opset)
    b, perms = exports.get(C.make, "bn_after_relu", dynamo, opset, seed=1)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(a)).graph.node) == 3  # as exported
    net = _reproduces(a)
    assert _op_types(net) == ["conv", "Relu", "conv", "Relu", "Flatten", "fc", "Relu", "fc"]
    result, _ = B.merge_copies_back(tmp_path, [a, b], SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


def _conv_pair(middle: list, inits: dict, pad2: int = 0, tail: list | None = None) -> onnx.ModelProto:
    """conv1(pad 1)-relu writing 'r', ``middle`` nodes from 'r' to 'a', conv2 (pads pad2)-relu-GAP-
    flatten-fc; ``tail`` replaces what follows conv2."""
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    inits = {"W1": f(4, 1, 3, 3), "b1": f(4), "W2": f(5, 4, 3, 3), "b2": f(5), "W3": f(3, 5), **inits}
    nodes = [helper.make_node("Conv", ["input", "W1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r"], name="relu1"), *middle,
             helper.make_node("Conv", ["a", "W2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[pad2] * 4)]
    nodes += tail if tail is not None else [
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3"], ["logits"], name="fc", transB=1)]
    return B.graph_model(nodes, inits, SHAPE, (3,))


def _bn_inits(rng, n: int = 4, positive: bool = False) -> dict:
    gamma = rng.random(n) + 0.5 if positive else rng.standard_normal(n)
    values = (gamma, rng.standard_normal(n), rng.standard_normal(n), rng.random(n) + 0.5)
    return {k: v.astype(np.float32) for k, v in zip(("gamma", "beta", "mean", "var"), values)}


BN = helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["a"], name="bn")
BN_M = helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["m"], name="bn")
CHANNEL = (1, 4, 1, 1)


@pytest.mark.parametrize("middle, consts, pad2", [
    ([BN], "bn", 0),
    ([BN_M, helper.make_node("MaxPool", ["m"], ["a"], name="pool", kernel_shape=[2, 2], strides=[2, 2])],
     "bn_positive", 0),
    ([helper.make_node("Mul", ["r", "s"], ["m"], name="mul"), helper.make_node("Sub", ["t3", "m"], ["d"], name="sub"),
      helper.make_node("Dropout", ["d"], ["a"], name="drop")], "mul_sub", 0),
    ([helper.make_node("Add", ["r", "t"], ["m"], name="add"),
      helper.make_node("AveragePool", ["m"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2])], "add", 0),
    ([helper.make_node("Mul", ["s", "r"], ["m"], name="mul"), helper.make_node("Div", ["m", "two"], ["a"], name="div")],
     "scale_only", 1),
], ids=["bn", "bn_then_maxpool", "mul_sub_dropout", "add_then_avgpool", "scale_before_padded_conv"])
def test_per_channel_affine_after_relu_folds_exactly(tmp_path, middle, consts, pad2):
    rng = np.random.default_rng(1)
    inits = {"bn": _bn_inits(rng), "bn_positive": _bn_inits(rng, positive=True),
             "mul_sub": {"s": rng.standard_normal(CHANNEL), "t3": rng.standard_normal((4, 1, 1))},
             "add": {"t": rng.standard_normal(CHANNEL)},
             "scale_only": {"s": rng.standard_normal(CHANNEL), "two": np.array(2.0)}}[consts]
    path = B.save(_conv_pair(middle, {k: v.astype(np.float32) for k, v in inits.items()}, pad2), tmp_path / "m.onnx")
    net = _reproduces(path)
    assert not {"BatchNormalization", "Mul", "Sub", "Add", "Div", "Dropout"} & set(_op_types(net))
    assert [layer.name for layer in net.layers] == ["conv1", "conv2", "fc1"]


def test_per_unit_mul_and_sub_right_after_a_layer_fold_into_it(tmp_path):
    rng = np.random.default_rng(2)
    middle = [helper.make_node("Mul", ["c2", "s5"], ["m"], name="scale"),
              helper.make_node("Sub", ["m", "t5"], ["o"], name="shift"),
              helper.make_node("Relu", ["o"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "W3"], ["z"], name="fc", transB=1),
              helper.make_node("Div", ["z", "temperature"], ["logits"], name="temperature")]
    inits = {"s5": rng.standard_normal((5, 1, 1)), "t5": rng.standard_normal((1, 5, 1, 1)),
             "temperature": np.array(0.5)}
    model = _conv_pair([helper.make_node("Identity", ["r"], ["a"], name="ident")],
                       {k: v.astype(np.float32) for k, v in inits.items()}, tail=middle)
    net = _reproduces(B.save(model, tmp_path / "m.onnx"))
    assert _op_types(net) == ["conv", "Relu", "conv", "Relu", "GlobalAveragePool", "Flatten", "fc"]


@pytest.mark.parametrize("opset", [11, 17])
def test_batchnorm1d_form_after_relu_folds_into_the_next_layer(tmp_path, opset):
    """Linear -> ReLU -> Unsqueeze -> BatchNormalization -> Squeeze -> Linear, axes as attributes and inputs."""
    rng = np.random.default_rng(3)
    n = B._Nodes(B.ExportForm(opset=opset))
    (W1, b1), (W2, b2) = B.mlp_weights([64, 6, 3], 3)
    x = n.add("Relu", [n.add("Gemm", [n.add("Flatten", ["input"]), n.const(W1, "W"), n.const(b1, "b")], transB=1)])
    params = [n.const(v, "bn") for v in _bn_inits(rng, 6).values()]
    x = n.axes_node("Squeeze", n.add("BatchNormalization", [n.axes_node("Unsqueeze", x, [2]), *params]), [2])
    n.add("Gemm", [x, n.const(W2, "W"), n.const(b2, "b")], transB=1)
    n.nodes[-1].output[0] = "logits"
    path = B.save(B.graph_model(n.nodes, n.inits, SHAPE, (3,), opset=opset), tmp_path / "m.onnx")
    assert _op_types(_reproduces(path)) == ["Flatten", "fc", "Relu", "fc"]


def _refused(model: onnx.ModelProto, tmp_path, why: str) -> None:
    path = B.save(model, tmp_path / "r.onnx")
    with pytest.raises(OnnxZipError, match=r"r\.onnx: " + why) as err:
        import_network(path)
    assert "\n" not in str(err.value)


def _permuted_conv_pair(inits: dict, seed: int) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """_conv_pair([BN], inits, pad2=1) with conv1's and conv2's units permuted (BN channels with conv1's)."""
    rng = np.random.default_rng(seed)
    model = _conv_pair([BN], inits, pad2=1)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    p1, p2 = rng.permutation(4), rng.permutation(5)
    new = {"W1": values["W1"][p1], "b1": values["b1"][p1], "W2": values["W2"][p2][:, p1], "b2": values["b2"][p2],
           "W3": values["W3"][:, p2], **{k: values[k][p1] for k in ("gamma", "beta", "mean", "var")}}
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[t.name]), t.name))
    return model, [p1, p2]


def test_an_offset_before_a_zero_padded_conv_runs_as_per_channel_steps(tmp_path):
    """A BatchNorm after a ReLU in front of a zero-padded conv (VGG with BN after the activation):
    folding its offset would make the padding read it, so it runs as per-channel Mul and Add steps in
    front of the conv; exact, and a permuted copy is recovered with both convs shared."""
    inits = _bn_inits(np.random.default_rng(4))
    a = B.save(_conv_pair([BN], inits, pad2=1), tmp_path / "a.onnx")
    permuted, perms = _permuted_conv_pair(inits, 5)
    b = B.save(permuted, tmp_path / "b.onnx")
    net = _reproduces(a)
    assert _op_types(net) == ["conv", "Relu", "Mul", "Add", "conv", "Relu", "GlobalAveragePool", "Flatten", "fc"]
    result, out = B.merge_copies_back(tmp_path, [a, b], SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)
    consts = {t.name for t in onnx.load(str(out)).graph.initializer if ".add." in t.name or ".mul." in t.name}
    assert len(consts) == 4  # each task's own scale and offset of the shared channels


@pytest.mark.parametrize("middle, consts, why", [
    ([BN_M, helper.make_node("Relu", ["m"], ["a2"], name="relu_b")], "bn",
     r"node 'relu_b' \(Relu\) lies between the per-channel affine 'bn' \(BatchNormalization\) and the next layer"),
    ([helper.make_node("Mul", ["r", "s"], ["m"], name="mul"),
      helper.make_node("MaxPool", ["m"], ["a2"], name="pool", kernel_shape=[2, 2], strides=[2, 2])], "negative",
     r"node 'pool' \(MaxPool\) max-pools the output of the per-channel affine 'mul' \(Mul\), which has negative "
     r"scales for channel\(s\) \[1\]"),
    ([helper.make_node("Add", ["r", "t"], ["m"], name="add"),
      helper.make_node("AveragePool", ["m"], ["a2"], name="avg", kernel_shape=[3, 3], pads=[1] * 4,
                       count_include_pad=1)], "offset",
     r"node 'avg' \(AveragePool\) averages zero padding \(count_include_pad=1\)"),
    ([BN_M, helper.make_node("Add", ["m", "r"], ["a2"], name="join")], "bn",
     r"node 'join' \(Add\) joins the output of the per-channel affine 'bn' \(BatchNormalization\) with another tensor"),
    ([helper.make_node("Mul", ["r", "columns"], ["a2"], name="mul")], "columns",
     r"node 'mul' \(Mul\) applies a constant of shape \[1, 1, 1, 8\] to a tensor of shape \[None, 4, 8, 8\]; only "
     r"a scalar or one value per channel is supported"),
], ids=["relu_between", "maxpool_negative_scale", "avgpool_padding", "residual_join", "not_per_channel"])
def test_affines_that_cannot_fold_forward_are_refused_by_name(tmp_path, middle, consts, why):
    rng = np.random.default_rng(5)
    inits = {"bn": _bn_inits(rng), "negative": {"s": np.array([1, -2, 3, 4], np.float32).reshape(CHANNEL)},
             "offset": {"t": rng.standard_normal(CHANNEL).astype(np.float32)},
             "columns": {"columns": rng.standard_normal((1, 1, 1, 8)).astype(np.float32)}}[consts]
    _refused(_conv_pair(middle + [helper.make_node("Identity", ["a2"], ["a"], name="to_conv2")], inits), tmp_path, why)


def test_an_affine_that_forks_or_reaches_no_layer_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(6)
    inits = {**_bn_inits(rng), "W2b": rng.standard_normal((5, 4, 3, 3)).astype(np.float32)}
    fork = [helper.make_node("Conv", ["a", "W2b"], ["c2b"], name="conv2b", kernel_shape=[3, 3]),
            helper.make_node("Add", ["c2", "c2b"], ["s"], name="join"),
            helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "W3"], ["logits"], name="fc", transB=1)]
    _refused(_conv_pair([BN], inits, tail=fork), tmp_path,
             r"node 'bn' \(BatchNormalization\) is a per-channel affine after an activation whose output 'a' feeds "
             r"several nodes \('conv2' \(Conv\), 'conv2b' \(Conv\)\); it can only be folded into a single next layer")
    last = [helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "W3"], ["z"], name="fc", transB=1),
            helper.make_node("Relu", ["z"], ["h"], name="relu_out"),
            helper.make_node("Mul", ["h", "half"], ["logits"], name="halve")]
    model = _conv_pair([helper.make_node("Identity", ["r"], ["a"], name="ident")], {"half": np.array(0.5, np.float32)},
                       tail=last)
    _refused(model, tmp_path, r"node 'halve' \(Mul\) is a per-channel affine after an activation that no weight "
                              r"layer follows")


# 2. Squeeze after a global average pool is a flattening


class _SqueezedPool(torch.nn.Module):
    """conv-relu-conv-relu, a global average pool squeezed to [N, C], fc-relu-fc."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 6, 3)
        self.f1, self.f2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        if self.kind == "mean_squeeze":
            x = x.mean((2, 3), keepdim=True).squeeze(-1).squeeze(-1)
        else:
            x = torch.squeeze(self.pool(x))
        return self.f2(torch.relu(self.f1(x)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mean_squeeze", "pool_squeeze"])
@pytest.mark.parametrize("dynamo, opset", [(False, 11), (False, 17), (True, 18)])
def test_squeeze_after_a_global_pool_is_a_flattening(exports, kind, dynamo, opset):
    path, _ = exports.get(lambda seed: (_SqueezedPool(kind), None), f"pool_{kind}", dynamo, opset)
    assert "Squeeze" in {n.op_type for n in onnx.load(str(path)).graph.node}  # as exported
    net = _reproduces(path, tol=TOL)
    assert _op_types(net) == ["conv", "Relu", "conv", "Relu", "GlobalAveragePool", "Flatten", "fc", "Relu", "fc"]


def _pooled(squeeze: list, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"), *squeeze,
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1)]
    inits = {"W1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
             "W2": rng.standard_normal((3, 4)).astype(np.float32),
             "a23": np.array([2, 3], np.int64), "neg": np.array([-1, -2], np.int64), "last": np.array([-1], np.int64)}
    return B.graph_model(nodes, inits, SHAPE, (3,), opset=opset)


@pytest.mark.parametrize("squeeze, opset", [
    ([helper.make_node("Squeeze", ["g"], ["f"], name="sq", axes=[2, 3])], 11),
    ([helper.make_node("Squeeze", ["g", "a23"], ["f"], name="sq")], 17),
    ([helper.make_node("Squeeze", ["g", "neg"], ["f"], name="sq")], 17),
    ([helper.make_node("Squeeze", ["g"], ["f"], name="sq")], 17),
    ([helper.make_node("Squeeze", ["g", "last"], ["h"], name="sq1"),
      helper.make_node("Squeeze", ["h", "last"], ["f"], name="sq2")], 17),
    ([helper.make_node("Squeeze", ["g", "last"], ["h"], name="sq1"),
      helper.make_node("Flatten", ["h"], ["f"], name="flat")], 13),
], ids=["axes_attribute", "axes_input", "negative_axes", "no_axes", "two_squeezes", "squeeze_then_flatten"])
def test_squeeze_forms_after_a_global_pool(tmp_path, squeeze, opset):
    net = _reproduces(B.save(_pooled(squeeze, opset), tmp_path / "m.onnx"))
    assert _op_types(net) == ["conv", "Relu", "GlobalAveragePool", "Flatten", "fc"]


def test_a_partial_squeeze_that_nothing_completes_is_refused(tmp_path):
    squeeze = [helper.make_node("Squeeze", ["g", "last"], ["h"], name="sq1"),
               helper.make_node("Relu", ["h"], ["h2"], name="relu_h"),
               helper.make_node("Squeeze", ["h2", "last"], ["f"], name="sq2")]
    _refused(_pooled(squeeze), tmp_path, r"node 'sq1' \(Squeeze\) squeezes a tensor of shape \[None, 4, 1, 1\] to "
                                         r"\[None, 4, 1\]; only a squeeze to \[batch, features\]")


# 3. Flattening shapes computed by Shape chains, with a dynamic batch


class _FlatCNN(torch.nn.Module):
    """conv-relu-maxpool-conv-relu, flattened the way ``kind`` says, fc-relu-fc."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 5, 3)
        self.f1, self.f2 = torch.nn.Linear(5 * 2 * 2, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.c2(torch.max_pool2d(torch.relu(self.c1(x)), 2)))
        if self.kind == "view":
            x = x.view(x.size(0), -1)
        elif self.kind == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = torch.flatten(x, 1)
        return self.f2(torch.relu(self.f1(x)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["view", "reshape", "flatten"])
@pytest.mark.parametrize("dynamo, opset", [(False, 11), (False, 17), (True, 18)])
def test_computed_flattening_shapes_with_a_dynamic_batch(exports, kind, dynamo, opset):
    path, _ = exports.get(lambda seed: (_FlatCNN(kind), None), f"flat_{kind}", dynamo, opset)
    net = _reproduces(path, tol=TOL, batches=(1, 7))
    assert _op_types(net) == ["conv", "Relu", "MaxPool", "conv", "Relu", "Flatten", "fc", "Relu", "fc"]


# 4. Linear layers on [N, 1, F]: a MatMul that only flattens


class _Rank3MLP(torch.nn.Module):
    """x.view(N, 1, -1), Linear-ReLU-Linear on [N, 1, F], then view(N, -1) or (keep) the [N, 1, C] output."""

    F, H, CLASSES = 64, 12, 5

    def __init__(self, keep: bool):
        super().__init__()
        torch.manual_seed(0)
        self.keep = keep
        self.f1, self.f2 = torch.nn.Linear(_Rank3MLP.F, _Rank3MLP.H), torch.nn.Linear(_Rank3MLP.H, _Rank3MLP.CLASSES)

    def forward(self, x):
        n = x.shape[0]
        h = self.f2(torch.relu(self.f1(x.view(n, 1, -1))))
        return h if self.keep else h.view(n, -1)

    @staticmethod
    def make(keep: bool, seed):
        net = _Rank3MLP(keep)
        if seed is None:
            return net, None
        perm = np.random.default_rng(seed).permutation(_Rank3MLP.H)
        _permute_units(net.f1, perm, reader=net.f2)
        return net, [perm]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True], ids=["to_batch_classes", "keeps_unit_axis"])
@pytest.mark.parametrize("dynamo, opset", ONE_EACH, ids=ONE_EACH_IDS)
def test_matmul_on_a_unit_axis_is_a_fully_connected_layer(tmp_path, exports, keep, dynamo, opset):
    C = _Rank3MLP
    a, _ = exports.get(lambda seed: C.make(keep, seed), f"rank3_{keep}", dynamo, opset)
    b, perms = exports.get(lambda seed: C.make(keep, seed), f"rank3_{keep}", dynamo, opset, seed=1)
    net = _reproduces(a, tol=TOL)
    ops = _op_types(net)
    assert ops[:4] == ["Flatten", "fc", "Relu", "fc"] and len(ops) == 5
    last = net.steps[-1]
    if keep:  # the file's [N, 1, 5] output, restored by a final Reshape
        assert (last.op_type, last.attr_dict()) == ("Reshape", {"shape": (0, 1, C.CLASSES)})
    else:
        assert last.op_type == "Flatten"
    result, out = B.merge_copies_back(tmp_path, [a, b], SHAPE)
    _assert_pairs(result.plan, perms)
    outputs = onnx.load(str(out)).graph.output
    dims = [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in outputs]
    assert all(d[1:] == ([1, C.CLASSES] if keep else [C.CLASSES]) for d in dims)


def _rank3_graph(tail: list, in_shape, weights, out_shape=(3,)) -> onnx.ModelProto:
    (W1, b1), (W2, b2) = weights
    nodes = [helper.make_node("MatMul", ["input", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["z"], name="add2"), *tail]
    inits = {"W1": W1.T.copy(), "b1": b1, "W2": W2.T.copy(), "b2": b2, "one": np.array([1], np.int64)}
    return B.graph_model(nodes, inits, in_shape, out_shape)


def test_matmul_on_a_rank3_input_and_a_final_squeeze(tmp_path):
    """The input itself [N, 1, 16] into MatMul (a Flatten step is added), a Squeeze of axis 1 at the end."""
    weights = B.mlp_weights([16, 6, 3], 8)
    permuted, perms = B.permute_hidden(weights, 9)
    tail = [helper.make_node("Squeeze", ["z", "one"], ["logits"], name="squeeze")]
    a = B.save(_rank3_graph(tail, (1, 16), weights), tmp_path / "a.onnx")
    b = B.save(_rank3_graph(tail, (1, 16), permuted), tmp_path / "b.onnx")
    assert _op_types(_reproduces(a, (1, 16), tol=TOL)) == ["Flatten", "fc", "Relu", "fc", "Flatten"]
    result, _ = B.merge_copies_back(tmp_path, [a, b], (1, 16))
    _assert_pairs(result.plan, perms)


def test_matmul_over_the_last_axis_of_an_image_is_refused(tmp_path):
    model = _rank3_graph([helper.make_node("Flatten", ["z"], ["logits"], name="flatten")], (4, 16),
                         B.mlp_weights([16, 6, 3], 8), out_shape=(12,))
    _refused(model, tmp_path, r"node 'mm1' \(MatMul\) reads an input of shape \[None, 4, 16\]; fully connected layers "
                              r"need \[batch, features\] \(or \[batch, 1, \.\.\., 1, features\]\)")


# 5. A reshape of a flat input to an image in front of the first layer


class _ImageFromFlat(torch.nn.Module):
    """A conv net on [N, 64] viewed as [N, 1, 8, 8] after scaling, or on [N, 8, 8] unsqueezed and then scaled."""

    C, H, CLASSES = 4, 6, 3

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        C = _ImageFromFlat
        self.kind = kind
        self.c1 = torch.nn.Conv2d(1, C.C, 3)
        self.f1, self.f2 = torch.nn.Linear(C.C * 3 * 3, C.H), torch.nn.Linear(C.H, C.CLASSES)

    def forward(self, x):
        if self.kind == "view":
            x = (x / 255.0 - 0.5).view(-1, 1, 8, 8)
        elif self.kind == "view_batch":  # a computed target: Shape -> Gather -> Unsqueeze -> Concat
            x = (x / 255.0 - 0.5).view(x.size(0), 1, 8, 8)
        else:
            x = x.unsqueeze(1) * 2.0
        x = torch.flatten(torch.max_pool2d(torch.relu(self.c1(x)), 2), 1)
        return self.f2(torch.relu(self.f1(x)))

    @staticmethod
    def make(kind: str, seed):
        net, C = _ImageFromFlat(kind), _ImageFromFlat
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(C.C), rng.permutation(C.H)]
        _permute_units(net.c1, perms[0], reader=net.f1, rep=9)
        _permute_units(net.f1, perms[1], reader=net.f2)
        return net, perms


@pytest.mark.slow
@pytest.mark.parametrize("kind, shape", [("view", (64,)), ("view_batch", (64,)), ("unsqueeze", (8, 8))])
@pytest.mark.parametrize("dynamo, opset", ONE_EACH, ids=ONE_EACH_IDS)
def test_a_reshape_of_the_input_to_an_image_is_kept_as_a_step(tmp_path, exports, kind, shape, dynamo, opset):
    C = _ImageFromFlat
    a, _ = exports.get(lambda seed: C.make(kind, seed), f"image_{kind}", dynamo, opset, shape)
    b, perms = exports.get(lambda seed: C.make(kind, seed), f"image_{kind}", dynamo, opset, shape, seed=1)
    net = _reproduces(a, shape)
    assert net.steps[0].op_type == "Reshape" and net.steps[0].attr_dict() == {"shape": (0, 1, 8, 8)}
    assert _op_types(net) == ["Reshape", "conv", "Relu", "MaxPool", "Flatten", "fc", "Relu", "fc"]  # scaling folded
    result, _ = B.merge_copies_back(tmp_path, [a, b], shape, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


def test_a_reshape_of_the_input_that_changes_the_batch_is_refused(tmp_path):
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Reshape", ["input", "target"], ["img"], name="to_image"),
             helper.make_node("Conv", ["img", "W1"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="fc", transB=1)]
    inits = {"target": np.array([-1, 1, 4, 4], np.int64), "W1": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
             "W2": rng.standard_normal((3, 8)).astype(np.float32)}
    model = B.graph_model(nodes, inits, (64,), (3,))
    _refused(model, tmp_path, r"node 'to_image' \(Reshape\) reshapes the input of shape \[None, 64\] to "
                              r"\[None, 1, 4, 4\]; only a reshape of known sizes that keeps the batch axis")


# 6. Opsets 9 to 21


class _LeNet(torch.nn.Module):
    """conv(pad 1)-BN2d-relu-maxpool-BN2d (after the pool: folds into conv2)-conv-relu6, a spatial mean
    squeezed to [N, C] (ReduceMean axes as attribute or input, Squeeze axes likewise),
    fc-relu-dropout-fc-log_softmax (LogSoftmax's axis semantics before opset 13)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn1 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.bn2, self.c2 = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 6, 3)
        self.f1, self.f2, self.drop = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), torch.nn.Dropout(0.5)
        randomise(self.bn1, 0)
        randomise(self.bn2, 1)

    def forward(self, x):
        x = self.bn2(torch.max_pool2d(torch.relu(self.bn1(self.c1(x))), 2))
        x = torch.nn.functional.relu6(self.c2(x))
        x = x.mean((2, 3), keepdim=True).squeeze(-1).squeeze(-1)
        return torch.log_softmax(self.f2(self.drop(torch.relu(self.f1(x)))), 1)


# The TorchScript exporter writes opsets 9 to 20 and the dynamo exporter 18 and later: every opset
# listed here is written by the exporter named with it (none is skipped).
OPSETS = [(False, 9), (False, 11), (False, 13), (False, 17), (True, 18), (True, 21)]


@pytest.mark.slow
@pytest.mark.parametrize("dynamo, opset", OPSETS, ids=[f"{'dynamo' if d else 'torchscript'}{o}" for d, o in OPSETS])
def test_a_lenet_imports_at_every_opset(exports, dynamo, opset):
    path, _ = exports.get(lambda seed: (_LeNet(), None), "lenet", dynamo, opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    net = _reproduces(path, batches=(1, 4))
    assert _op_types(net) == ["conv", "Relu", "MaxPool", "conv", "Clip", "GlobalAveragePool", "Flatten", "fc", "Relu",
                              "fc", "LogSoftmax"]


# 7. An MLP and a ResNet block as both exporters write them, merged with a permuted copy


class _MLP(torch.nn.Module):
    """Flatten-Linear-ReLU-Linear-ReLU-Linear on [N, 1, 8, 8]."""

    WIDTHS = (64, 16, 12, 5)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        w = _MLP.WIDTHS
        self.f1, self.f2, self.f3 = (torch.nn.Linear(i, o) for i, o in zip(w[:-1], w[1:]))

    def forward(self, x):
        return self.f3(torch.relu(self.f2(torch.relu(self.f1(torch.flatten(x, 1))))))

    @staticmethod
    def make(seed):
        net = _MLP()
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(_MLP.WIDTHS[1]), rng.permutation(_MLP.WIDTHS[2])]
        _permute_units(net.f1, perms[0], reader=net.f2)
        _permute_units(net.f2, perms[1], reader=net.f3)
        return net, perms


class _ResBlock(torch.nn.Module):
    """stem conv-BN-ReLU, one basic block (conv-BN-ReLU-conv-BN, identity skip, ReLU), global
    average pool, fc; convolutions without bias, as torchvision writes them."""

    C, CLASSES = 4, 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        C = _ResBlock.C
        self.stem, self.c1, self.c2 = (torch.nn.Conv2d(i, C, 3, padding=1, bias=False) for i in (1, C, C))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(C) for _ in range(3))
        for i, bn in enumerate(self.bns):
            randomise(bn, i)
        self.fc = torch.nn.Linear(C, _ResBlock.CLASSES)

    def forward(self, x):
        x = torch.relu(self.bns[0](self.stem(x)))
        y = torch.relu(self.bns[1](self.c1(x)))
        x = torch.relu(x + self.bns[2](self.c2(y)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def make(seed):
        net = _ResBlock()
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        stream, inner = (torch.from_numpy(rng.permutation(_ResBlock.C)) for _ in range(2))
        with torch.no_grad():
            for conv, bn, rows, cols in ((net.stem, net.bns[0], stream, None), (net.c1, net.bns[1], inner, stream),
                                         (net.c2, net.bns[2], stream, inner)):
                w = conv.weight[rows]
                conv.weight.copy_(w if cols is None else w[:, cols])
                permute_bn(bn, rows)
            net.fc.weight.copy_(net.fc.weight[:, stream])
        return net, [stream.numpy(), inner.numpy(), stream.numpy()]  # conv1 and conv3 write the stream


@pytest.mark.slow
@pytest.mark.parametrize("dynamo, opset", EXPORTERS, ids=EXPORTER_IDS)
@pytest.mark.parametrize("arch", ["mlp", "resblock"])
def test_an_mlp_and_a_resnet_block_import_as_exported_and_recover_a_permuted_copy(tmp_path, exports, arch,
                                                                                  dynamo, opset):
    make = _MLP.make if arch == "mlp" else _ResBlock.make
    a, _ = exports.get(make, arch, dynamo, opset)
    b, perms = exports.get(make, arch, dynamo, opset, seed=1)
    net = _reproduces(a)
    if arch == "resblock":
        assert "Add" in _op_types(net) and "GlobalAveragePool" in _op_types(net)
    result, _ = B.merge_copies_back(tmp_path, [a, b], SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


# 8. Per-channel input normalisation (torchvision's Normalize written into the graph)


class _Normalized(torch.nn.Module):
    """x / 255 (optional), then (x - mean) / std per channel, then conv (padded or not)-ReLU-GAP-fc on
    three-channel 8x8 images."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, pad: int, scaled: bool):
        super().__init__()
        torch.manual_seed(0)
        self.scaled = scaled
        self.c1 = torch.nn.Conv2d(3, 5, 3, padding=pad)
        self.c2 = torch.nn.Conv2d(5, 6, 3)
        self.fc = torch.nn.Linear(6, 4)
        self.register_buffer("mean", torch.tensor(_Normalized.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_Normalized.STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = ((x / 255.0 if self.scaled else x) - self.mean) / self.std
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def make(pad: int, scaled: bool, seed):
        net = _Normalized(pad, scaled)
        if seed is None:
            return net, None
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(5), rng.permutation(6)]
        _permute_units(net.c1, perms[0], reader=net.c2)
        _permute_units(net.c2, perms[1], reader=net.fc)
        return net, perms


@pytest.mark.slow
@pytest.mark.parametrize("pad, scaled, steps", [(0, False, []), (1, False, ["Mul", "Add"]), (1, True, ["Mul", "Add"])],
                         ids=["folded", "padded", "scaled_then_padded"])
@pytest.mark.parametrize("dynamo, opset", ONE_EACH, ids=ONE_EACH_IDS)
def test_per_channel_input_normalisation(tmp_path, exports, pad, scaled, steps, dynamo, opset):
    """Folded into an unpadded first conv; before a padded one it runs as per-channel Mul and Add
    steps, with a scalar /255 in front composed into them. Exact, and a permuted copy is recovered."""
    shape = (3, 8, 8)
    make = lambda seed: _Normalized.make(pad, scaled, seed)
    key = f"normalized_{pad}_{scaled}"
    a, _ = exports.get(make, key, dynamo, opset, shape)
    b, perms = exports.get(make, key, dynamo, opset, shape, seed=1)
    net = _reproduces(a, shape)
    assert _op_types(net)[:len(steps) + 1] == steps + ["conv"]
    result, _ = B.merge_copies_back(tmp_path, [a, b], shape, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


# 9. Elementwise joins and activations of mobile networks: SiLU, a squeeze-and-excitation gate,
# HardSwish (DESIGN.md section 6)


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["hard", "sigmoid"])
@pytest.mark.parametrize("dynamo, opset", EXPORTERS, ids=EXPORTER_IDS)
def test_silu_a_squeeze_and_excitation_gate_and_hardswish(tmp_path, exports, gate, dynamo, opset):
    """x * sigmoid(x) and the SE gate's Mul join unit spaces as an Add does: the gate's 1x1 conv writes
    the units it multiplies, so a permuted copy (one permutation across the gated space) is recovered."""
    a, _ = exports.get(lambda seed: SEBlock.make(gate, seed), f"se_{gate}", dynamo, opset)
    b, perms = exports.get(lambda seed: SEBlock.make(gate, seed), f"se_{gate}", dynamo, opset, seed=1)
    net = _reproduces(a)
    assert _op_types(net).count("Mul") >= 2 and unit_spaces(net).space == (0, 1, 0, 3, 4)
    result, _ = B.merge_copies_back(tmp_path, [a, b], SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


@pytest.mark.slow
def test_se_blocks_with_three_copies_gated_and_half_shared(tmp_path, exports):
    """Three permuted copies in the gated layout recover the original; at 50% sharing emitted == tied."""
    make = lambda seed: SEBlock.make("hard", seed)
    paths = [exports.get(make, "se_hard", True, 18, seed=seed)[0] for seed in (None, 1, 2)]
    B.merge_copies_back(tmp_path / "three", paths, SHAPE, layout="gated", tol=FOLD_TOL)
    result = merge(paths[:2], B.calib_folder(tmp_path / "c", SHAPE, 64), tmp_path / "half.onnx", MergeOptions(share=0.5))
    assert [lp.n_shared for lp in result.plan.layers] == [3, 2, 3, 2, 0]  # the gate's conv follows conv1's units
    assert all(c.max_diff_vs_tied <= TOL for c in result.checks)


# 10. Depthwise convolutions and PRelu (channel ops) in inverted residual blocks (DESIGN.md section 6)

MOBILE_SHAPE = (1, 12, 12)
# (activation, SE gate): MobileNetV2 (ReLU6), MobileNetV3 (HardSwish, SE with HardSigmoid),
# EfficientNet (SiLU, SE with Sigmoid), and PRelu.
MOBILE_FORMS = [("relu6", False), ("hardswish", True), ("silu", True), ("prelu", False)]


def _mobile(exports, act: str, se: bool, dynamo: bool, opset: int, seed=None):
    return exports.get(lambda s: MobileBlocks.make(act, se, s), f"mobile_{act}_{se}", dynamo, opset, MOBILE_SHAPE,
                       seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("act, se", MOBILE_FORMS, ids=[a for a, _ in MOBILE_FORMS])
@pytest.mark.parametrize("dynamo, opset", EXPORTERS, ids=EXPORTER_IDS)
def test_inverted_residuals_with_depthwise_convs_recover_a_permuted_copy(tmp_path, exports, act, se, dynamo, opset):
    """A depthwise conv is a channel op in the space it reads (its BatchNorm folded in), a PRelu's slope
    too; a copy permuted consistently across each space (expansion, depthwise, SE, projection and the
    residual stream) is recovered exactly, the depthwise kernels and slopes stored once."""
    a, _ = _mobile(exports, act, se, dynamo, opset)
    b, perms = _mobile(exports, act, se, dynamo, opset, seed=1)
    net = _reproduces(a, MOBILE_SHAPE)
    ops = [s for _, s in net.channel_ops]
    assert [o.op_type for o in ops if o.op_type == DEPTHWISE] == [DEPTHWISE] * 2
    assert sum(o.op_type == PRELU for o in ops) == (5 if act == "prelu" else 0)
    spaces = unit_spaces(net)
    assert dict(spaces.ops)[net.channel_ops[0 if act != "prelu" else 2][0]] == 1  # dw1 lies in the expansion's space
    result, out = B.merge_copies_back(tmp_path, [a, b], MOBILE_SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)
    inits = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert {"dw1.shared.W", "dw1.shared.B", "dw2.shared.W"} <= inits and not any(".task_" in n for n in inits
                                                                                  if n.startswith("dw"))


@pytest.mark.slow
def test_depthwise_blocks_with_three_copies_gated_share_zero_and_half(tmp_path, exports):
    """Three permuted copies in the gated layout recover the original; share 0 reproduces every
    original; at 50% sharing emitted == tied, the depthwise convs split into shared and own groups."""
    paths = [_mobile(exports, "hardswish", True, True, 18, seed=s)[0] for s in (None, 1, 2)]
    B.merge_copies_back(tmp_path / "three", paths, MOBILE_SHAPE, layout="gated", tol=FOLD_TOL)
    calib = B.calib_folder(tmp_path / "c", MOBILE_SHAPE, 64)
    other = _mobile(exports, "hardswish", True, False, 17)[0]  # the same weights, exported by TorchScript
    x = np.random.default_rng(3).random((8, *MOBILE_SHAPE), dtype=np.float32)
    zero = merge([paths[0], paths[1]], calib, tmp_path / "zero.onnx", MergeOptions(share=0.0))
    assert all(lp.n_shared == 0 for lp in zero.plan.layers)
    for t, path in enumerate(paths[:2]):
        np.testing.assert_allclose(B.task_output(tmp_path / "zero.onnx", x, "multi", t), B.run(path, x)[0],
                                   rtol=TOL, atol=TOL)
    half = merge([paths[0], paths[2], other], calib, tmp_path / "half.onnx", MergeOptions(share=0.5, layout="gated"))
    assert [lp.n_shared for lp in half.plan.layers] == [2, 4, 2, 4, 2, 3, 5, 0]
    assert all(c.max_diff_vs_tied <= TOL for c in half.checks)
    model = onnx.load(str(tmp_path / "half.onnx"))
    convs = [n for n in B.all_nodes(model.graph) if n.op_type == "Conv" and n.name.startswith("dw1.")]
    assert {next(a.i for a in n.attribute if a.name == "group") for n in convs} == {4}  # 4 shared, 4 own per task
    kernels = sorted(t.name for t in model.graph.initializer if t.name.startswith("dw1."))
    assert len(kernels) == 8 and {"dw1.shared.W", "dw1.shared.B"} <= set(kernels)  # shared once, 3 tasks' own


def _grouped(exports, dynamo: bool, opset: int, seed=None):
    return exports.get(GroupedBlocks.make, "grouped", dynamo, opset, MOBILE_SHAPE, seed=seed)


def _conv_groups(path, prefix: str = "") -> dict[str, int]:
    """Each Conv node's group attribute (1 where it has none), by node name."""
    return {n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in B.all_nodes(onnx.load(str(path)).graph) if n.op_type == "Conv" and n.name.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("dynamo, opset", EXPORTERS, ids=EXPORTER_IDS)
def test_grouped_convolutions_recover_a_permuted_copy(tmp_path, exports, dynamo, opset):
    """Grouped convs (ResNeXt's 3x3, a grouped 1x1 on a residual stream, a depthwise conv with channel
    multiplier 2) import as layers; the spaces they read are paired in whole groups and the spaces they
    write follow; a copy permuted in whole groups is recovered exactly and emitted as grouped Convs again."""
    a, _ = _grouped(exports, dynamo, opset)
    b, perms = _grouped(exports, dynamo, opset, seed=1)
    net = _reproduces(a, MOBILE_SHAPE)
    assert [l.group for l in net.layers] == [1, 1, 4, 1, 2, 1, 6, 1]
    spaces = unit_spaces(net)
    assert spaces.grouped == ((0, 2), (1, 4), (2, 4), (4, 2), (5, 6), (6, 6)) and spaces.follows == ((2, 1), (4, 0), (6, 5))
    result, out = B.merge_copies_back(tmp_path, [a, b], MOBILE_SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)
    assert _conv_groups(out, "gconv") == {"gconv1.shared.Conv": 4, "gconv2.shared.Conv": 2, "gconv3.shared.Conv": 6}
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert shapes["gconv1.shared.W"] == (8, 2, 3, 3) and shapes["gconv3.shared.W"] == (12, 1, 3, 3)


@pytest.mark.slow
def test_grouped_blocks_with_three_copies_gated_share_zero_and_half(tmp_path, exports):
    """Three permuted copies gated recover the original; share 0 reproduces each original; at 50% (three
    different nets, both exporters) emitted == tied, every share whole groups, each grouped conv's shared
    and own blocks grouped Convs stored once, and the parameters as budget.merged_params predicts."""
    paths = [_grouped(exports, True, 18, seed=s)[0] for s in (None, 1, 2)]
    B.merge_copies_back(tmp_path / "three", paths, MOBILE_SHAPE, layout="gated", tol=FOLD_TOL)
    calib = B.calib_folder(tmp_path / "c", MOBILE_SHAPE, 64)
    x = np.random.default_rng(3).random((8, *MOBILE_SHAPE), dtype=np.float32)
    zero = merge(paths[:2], calib, tmp_path / "zero.onnx", MergeOptions(share=0.0))
    assert all(lp.n_shared == 0 for lp in zero.plan.layers)
    for t, path in enumerate(paths[:2]):
        np.testing.assert_allclose(B.task_output(tmp_path / "zero.onnx", x, "multi", t), B.run(path, x)[0],
                                   rtol=TOL, atol=TOL)
    others = [B.export_torch(GroupedBlocks(seed=s), tmp_path / f"n{s}.onnx", s == 1, 18 if s == 1 else 17, MOBILE_SHAPE)
              for s in (1, 2, 3)]
    half = merge(others, calib, tmp_path / "half.onnx", MergeOptions(share=0.5, layout="gated"))
    # the stream and the reduce conv's units: whole groups of 4 and 2; each grouped conv's output follows
    assert [lp.n_shared for lp in half.plan.layers] == [4, 4, 4, 4, 6, 3, 6, 0]
    assert all(c.max_diff_vs_tied <= TOL for c in half.checks)
    groups = _conv_groups(tmp_path / "half.onnx", "gconv1.")
    assert set(groups.values()) == {2}  # 2 shared groups, 2 own per task
    inits = {t.name: tuple(t.dims) for t in onnx.load(str(tmp_path / "half.onnx")).graph.initializer}
    assert sorted(n for n in inits if n.startswith("gconv1.") and n.endswith(".W")) == \
        ["gconv1.shared.W", "gconv1.task_n1.W", "gconv1.task_n2.W", "gconv1.task_n3.W"]
    assert inits["gconv1.shared.W"] == (4, 2, 3, 3)
    nets = [import_network(p) for p in others]
    counts = [lp.n_shared for lp in half.plan.layers]
    assert half.params_merged == merged_params(nets, [counts[s] for s in free_spaces(nets[0])])


def _grouped_graph(tmp_path, name: str, convs: list[tuple[str, str, int, int, int]], tail_from: str,
                   extra: list | None = None) -> onnx.ModelProto:
    """A graph of Convs (name, input, out channels, in channels, group; 3x3, padded) on a 1x8x8 input, then
    the extra nodes, a global pool of ``tail_from`` and a Flatten."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for conv, x, o, c, g in convs:
        inits.append(numpy_helper.from_array(rng.standard_normal((o, c // g, 3, 3)).astype(np.float32), f"{conv}.W"))
        nodes.append(helper.make_node("Conv", [x, f"{conv}.W"], [conv], name=conv, group=g, pads=[1, 1, 1, 1]))
    nodes += (extra or []) + [helper.make_node("GlobalAveragePool", [tail_from], ["p"], name="pool"),
                              helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, None])], inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("convs, extra, tail, why", [
    ([("stem", "input", 4, 1, 1), ("g", "stem", 6, 4, 2), ("g2", "g", 6, 6, 3)], None, "g2",
     r"grouped\.onnx: grouped convolution 'gconv2' \(node 'g2'\) has 3 groups where another grouped layer on the "
     r"same units has 2"),
    ([("stem", "input", 4, 1, 1), ("g", "stem", 4, 4, 2)], [helper.make_node("Add", ["stem", "g"], ["s"], name="add")],
     "s", r"the output of grouped convolution 'gconv1' \(node 'g'\) is added to the output of another layer"),
    ([("stem", "input", 4, 1, 1), ("g", "stem", 6, 4, 4)], None, "g",
     r"node 'g' \(Conv\) has group=4 with weight \[6, 1, 3, 3\]: its 6 output channels do not split"),
], ids=["two-group-counts", "joined-output", "uneven-groups"])
def test_grouped_convolutions_that_cannot_pair_in_groups_are_refused_by_name(tmp_path, convs, extra, tail, why):
    path = _grouped_graph(tmp_path, "grouped", convs, tail, extra)
    with pytest.raises(OnnxZipError, match=why):
        unit_spaces(import_network(path))


class _Shuffle(torch.nn.Module):
    """conv, ReLU, ShuffleNet's channel shuffle (view to groups, transpose, reshape back), grouped conv, fc."""

    def __init__(self):
        super().__init__()
        self.c, self.g, self.fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), \
            torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c(x))
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.fc(torch.relu(self.g(h)).mean((2, 3)))


@pytest.mark.parametrize("dynamo, opset", ONE_EACH, ids=ONE_EACH_IDS)
def test_a_channel_shuffle_is_refused_by_name(tmp_path, dynamo, opset):
    path = _export(_Shuffle(), tmp_path / "shuffle.onnx", dynamo, opset)
    with pytest.raises(OnnxZipError, match=r"shuffle\.onnx: node '.*' \(Reshape\) splits the 8 channels of a tensor of "
                                           r"shape \[None, 8, 8, 8\] into \[2, 4\], as a channel shuffle \(ShuffleNet"):
        import_network(path)


def test_a_grouped_convs_share_cannot_be_set_on_its_own(tmp_path, exports):
    """A grouped conv shares the groups of the units it reads: --share-layer on it is refused by name."""
    a, _ = _grouped(exports, True, 18)
    b, _ = _grouped(exports, True, 18, seed=1)
    calib = B.calib_folder(tmp_path / "c", MOBILE_SHAPE, 32)
    with pytest.raises(OnnxZipError, match=r"--share-layer gconv1: 'gconv1' \(node '.*'\) is a grouped convolution; "
                                           r"it shares the groups of the units it reads"):
        merge([a, b], calib, tmp_path / "m.onnx", MergeOptions(share_layers=(("gconv1", 0.5),)))
    assert not (tmp_path / "m.onnx").exists()


def _alike_expansions(net) -> None:
    """Every expansion channel alike (equal weights and BatchNorm): only the depthwise kernels after
    them tell the channels apart."""
    net.exp.weight.copy_(net.exp.weight[:1].expand_as(net.exp.weight).clone())
    for t in (net.bn1.weight, net.bn1.bias, net.bn1.running_mean, net.bn1.running_var):
        t.copy_(t[:1].expand_as(t).clone())


def _identical_expansions(seed):
    return MobileBlocks.make("relu6", False, seed, prepare=_alike_expansions)


@pytest.mark.slow
def test_depthwise_kernels_add_their_cost_to_the_pairing(tmp_path, exports):
    """Where the expansion conv cannot tell its channels apart (every pair costs the same), the
    depthwise kernels' per-channel costs (Eq. 12 with each channel's patch Hessian) find the permutation."""
    a, _ = exports.get(_identical_expansions, "identical_expansions", True, 18, MOBILE_SHAPE)
    b, perms = exports.get(_identical_expansions, "identical_expansions", True, 18, MOBILE_SHAPE, seed=1)
    result, _ = B.merge_copies_back(tmp_path, [a, b], MOBILE_SHAPE, tol=FOLD_TOL)
    _assert_pairs(result.plan, perms)


class _DepthwiseAfterConcat(torch.nn.Module):
    """stem conv, two 1x1 branches concatenated, a depthwise conv over the Concat, pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2 = torch.nn.Conv2d(1, 3, 3), torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(3, 2, 1)
        self.dw, self.fc = torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.dw(torch.cat([self.b1(h), self.b2(h)], 1))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_a_depthwise_conv_after_a_concat_is_refused_by_name(tmp_path):
    path = _export(_DepthwiseAfterConcat(), tmp_path / "dwcat.onnx", True, 18)
    with pytest.raises(OnnxZipError, match=r"dwcat\.onnx: 'dw1' \(node '.*'\) reads a Concat of branches; a depthwise "
                                           r"Conv is only supported on the output of one layer"):
        B.merge_copies_back(tmp_path, [path, path], SHAPE)
