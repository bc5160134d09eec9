"""Constant folding at import (onnxzip.fold): a weight that an exporter computes from initializers
(TorchScript with do_constant_folding=False writes Transpose(weight) before a MatMul; converters
write Reshape(initializer, shape)) is a weight, as the exporter writes it and hand-built."""


import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import builders as B
from onnxzip.canonical import import_network
from onnxzip.fold import fold_constants, foldable

torch = pytest.importorskip("torch")

SHAPE = (1, 4, 4)
WIDTHS = (16, 12, 5)


class _TransposedWeightMLP(torch.nn.Module):
    """fc1 as x @ W.T + b written out, so the exported graph computes W.T from the initializer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = torch.nn.Linear(*WIDTHS[:2]), torch.nn.Linear(*WIDTHS[1:])

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc2(torch.relu(x @ self.fc1.weight.t() + self.fc1.bias))


def _permuted(module: _TransposedWeightMLP, seed: int) -> _TransposedWeightMLP:
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(WIDTHS[1]))
    out = _TransposedWeightMLP(0)
    with torch.no_grad():
        out.fc1.weight.copy_(module.fc1.weight[perm]), out.fc1.bias.copy_(module.fc1.bias[perm])
        out.fc2.weight.copy_(module.fc2.weight[:, perm]), out.fc2.bias.copy_(module.fc2.bias)
    return out


def _export(module, path, opset: int, dynamo: bool, initializers_as_inputs: bool = False):
    return B.export_torch(module, path, dynamo, opset, SHAPE, do_constant_folding=False,
                          keep_initializers_as_inputs=initializers_as_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("dynamo", [False, True])
def test_exported_weight_transposes_fold_and_a_permuted_copy_merges_back(tmp_path, opset, dynamo):
    module = _TransposedWeightMLP(1)
    a = _export(module, tmp_path / "a.onnx", opset, dynamo)
    b = _export(_permuted(module, 2), tmp_path / "b.onnx", opset, dynamo)
    net = import_network(a)
    assert [layer.W.shape for layer in net.layers] == [(12, 16), (5, 12)]
    np.testing.assert_allclose(net.layers[0].W, module.fc1.weight.detach().numpy(), rtol=0, atol=0)
    result, _ = B.merge_copies_back(tmp_path, [a, b], SHAPE)
    assert [lp.n_shared for lp in result.plan.layers] == [12, 0]


@pytest.mark.parametrize("opset", [9, 11])
def test_initializers_listed_as_graph_inputs_are_initializers(tmp_path, opset):
    """Older exports (keep_initializers_as_inputs) list every weight as a graph input too."""
    module = _TransposedWeightMLP(3)
    a = _export(module, tmp_path / "a.onnx", opset, False, initializers_as_inputs=True)
    b = _export(_permuted(module, 4), tmp_path / "b.onnx", opset, False, initializers_as_inputs=True)
    assert "fc1.weight" in [i.name for i in onnx.load(str(a)).graph.input]
    np.testing.assert_allclose(import_network(a).layers[0].W, module.fc1.weight.detach().numpy(), rtol=0, atol=0)
    B.merge_copies_back(tmp_path, [a, b], SHAPE)


def test_a_reshaped_initializer_is_a_weight(tmp_path):
    """Reshape(initializer [in*out], constant [out, in]) feeding a Gemm, as converters write it."""
    layers = B.mlp_weights([16, 6, 3], 0)
    model = B.mlp_model(layers, in_shape=SHAPE)
    W0 = next(t for t in model.graph.initializer if t.name == "W0")
    flat = numpy_helper.to_array(W0).reshape(-1)
    W0.CopyFrom(numpy_helper.from_array(flat, "W0_flat"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([6, 16], np.int64), "W0_shape"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["W0_flat", "W0_shape"], ["W0"], name="reshape_w0"))
    path = B.save(model, tmp_path / "reshaped.onnx")
    net = import_network(path)
    np.testing.assert_array_equal(net.layers[0].W, layers[0][0])


def test_a_model_without_constant_subgraphs_is_left_as_it_is(tmp_path):
    model = B.mlp_model(B.mlp_weights([16, 6, 3], 0), in_shape=SHAPE)
    assert not foldable(model) and fold_constants(model, tmp_path / "m.onnx") is model
