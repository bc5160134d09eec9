"""Real data: the committed LeNet-300-100 reference pair, fully merged without retraining.

MNIST is read from $ONNXZIP_DATASETS/mnist (default ../shared/datasets/mnist).
"""

from pathlib import Path

import pytest

import refdata
from onnxzip.api import merge
from onnxzip.options import MergeOptions

REFERENCE = Path(__file__).resolve().parent.parent / "models" / "reference"
CALIB_IMAGES = 2000
# Mean test-error increase allowed here; the benchmark paper_table1 measures the real figure.
MAX_MEAN_ERROR_INCREASE = 0.005


@pytest.mark.slow
def test_fully_merged_reference_pair_keeps_accuracy(tmp_path):
    if not refdata.idx_available("mnist"):
        pytest.fail(f"MNIST not found under {refdata.datasets_root()}; set {refdata.DATASETS_ENV}")
    x_train, _ = refdata.mnist_train_without_sample()
    x_test, y_test = refdata.load_idx("mnist", "test")
    refdata.write_npz_folder(tmp_path / "calib", x_train[:CALIB_IMAGES])
    refdata.write_npz_folder(tmp_path / "test", x_test, labels=y_test)
    models = [REFERENCE / "lenet300_a.onnx", REFERENCE / "lenet300_b.onnx"]
    test = tmp_path / "test"
    result = merge(models, tmp_path / "calib", tmp_path / "merged.onnx", MergeOptions(tasks=("a", "b")),
                   evals={"a": test, "b": test})
    assert all(lp.n_shared == lp.units[0] for lp in result.plan.layers[:-1])
    assert result.params_merged < 0.51 * sum(result.params_inputs)
    drops = [c.accuracy_original - c.accuracy_merged for c in result.checks]
    assert all(c.accuracy_original > 0.975 for c in result.checks), result.checks
    assert sum(drops) / len(drops) <= MAX_MEAN_ERROR_INCREASE, result.checks
