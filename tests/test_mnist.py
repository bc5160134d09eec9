"""Real data: two MNIST networks trained here with different seeds, fully merged without retraining.

MNIST is read from $ONNXZIP_DATASETS/mnist (default ../shared/datasets/mnist).
"""

import pytest

from onnxzip.api import merge
from onnxzip.options import MergeOptions

MAX_ACCURACY_DROP = 0.01


@pytest.mark.slow
def test_fully_merged_mnist_pair_keeps_accuracy(tmp_path, mnist_mlp):
    if not mnist_mlp.shared_mnist_available():
        pytest.fail(f"MNIST not found under {mnist_mlp.datasets_root()}; set {mnist_mlp.DATASETS_ENV}")
    built = mnist_mlp.build_demo(tmp_path, source="shared")
    out = tmp_path / "merged.onnx"
    test = tmp_path / "test"
    result = merge([tmp_path / "a.onnx", tmp_path / "b.onnx"], tmp_path / "calib", out, MergeOptions(),
                   evals={"a": test, "b": test})
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    assert result.params_merged < 0.51 * sum(result.params_inputs)
    for check in result.checks:
        assert check.accuracy_original > 0.96, built
        assert check.accuracy_merged >= check.accuracy_original - MAX_ACCURACY_DROP, check
