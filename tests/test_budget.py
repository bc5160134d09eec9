"""--budget and --target-size: per-layer shares chosen automatically, measured on held-out samples."""

import numpy as np
import pytest

import builders as B
from onnxzip.api import merge
from onnxzip.budget import BUDGET_HOLDOUT, merged_params
from onnxzip.calib import iter_batches
from onnxzip.canonical import import_network
from onnxzip.errors import OnnxZipError
from onnxzip.options import MergeOptions, parse_size

N_CALIB = 1000


def _similar_pair(tmp_path, noise=0.3):
    """A network and a permuted, perturbed copy: sharing costs a little fidelity, more with more sharing."""
    base = B.mlp_weights([64, 32, 16, 10], 0)
    perm, _ = B.permute_hidden(base, 1)
    rng = np.random.default_rng(0)
    other = [((W + noise * W.std() * rng.standard_normal(W.shape)).astype(np.float32), b) for W, b in perm]
    paths = [B.save(B.mlp_model(base), tmp_path / "a.onnx"), B.save(B.mlp_model(other), tmp_path / "b.onnx")]
    return paths, B.calib_folder(tmp_path / "calib", (1, 8, 8), n=N_CALIB)


def _heldout_drops(paths, merged, folder, skip=N_CALIB - int(N_CALIB * BUDGET_HOLDOUT)):
    """Per task: 100 - top-1 agreement (%) of the written model with its original on the folder's
    samples after the first ``skip`` (by default the held-out tail of the calibration samples)."""
    spec = import_network(paths[0]).input
    x = np.concatenate(list(iter_batches(folder, spec, 100)))[skip:]
    outs = B.run(merged, x)
    return [100.0 - 100.0 * float(np.mean(outs[t].argmax(1) == B.run(p, x)[0].argmax(1)))
            for t, p in enumerate(paths)]


@pytest.mark.parametrize("budget", [2.0, 5.0])
def test_budget_keeps_each_task_within_it_on_the_heldout_samples(tmp_path, budget):
    paths, calib = _similar_pair(tmp_path)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(budget=budget))
    s = result.search
    assert s.mode == "budget" and s.heldout_samples == (200, 200) and s.measure == ("agreement", "agreement")
    assert [lp.n_shared for lp in result.plan.layers[:-1]] == list(s.chosen.counts)
    assert s.chosen.params == result.params_merged < sum(result.params_inputs)  # it did share
    drops = _heldout_drops(paths, out, calib)
    assert max(drops) <= budget
    np.testing.assert_allclose(drops, s.chosen.drops, atol=1e-9)  # the written model is the probed one
    # every probe that shares more in every layer broke the budget or was not tried
    more = [p for p in s.probes if all(c >= d for c, d in zip(p.counts, s.chosen.counts)) and p != s.chosen]
    assert all(p.worst > budget for p in more)


def test_budget_data_measures_instead_of_the_calibration_tail(tmp_path):
    paths, calib = _similar_pair(tmp_path)
    measure = B.calib_folder(tmp_path / "measure", (1, 8, 8), n=300, seed=5)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(budget=3.0), budget_data={"a": measure, "b": measure})
    s = result.search
    assert s.heldout_samples == (300, 300) and s.chosen.params == result.params_merged < sum(result.params_inputs)
    assert s.forward_passes == len(s.probes) * 2 * (2 * N_CALIB + 300)  # every calibration sample calibrates
    drops = _heldout_drops(paths, out, measure, skip=0)
    assert max(drops) <= 3.0
    np.testing.assert_allclose(drops, s.chosen.drops, atol=1e-6)  # steps of 1/3 point; rounding only
    few = B.calib_folder(tmp_path / "few", (1, 8, 8), n=50)
    with pytest.raises(OnnxZipError, match="few: --budget-data needs at least 100 samples per task"):
        merge(paths, calib, tmp_path / "x.onnx", MergeOptions(budget=3.0), budget_data=few)
    with pytest.raises(OnnxZipError, match="no share search is asked for"):
        merge(paths, calib, tmp_path / "x.onnx", MergeOptions(share=0.5), budget_data=measure)
    assert not (tmp_path / "x.onnx").exists()


def test_a_larger_budget_shares_more(tmp_path):
    paths, calib = _similar_pair(tmp_path)
    small = merge(paths, calib, tmp_path / "s.onnx", MergeOptions(budget=1.0))
    large = merge(paths, calib, tmp_path / "l.onnx", MergeOptions(budget=8.0))
    assert large.params_merged < small.params_merged
    assert small.search.chosen.worst <= 1.0 and large.search.chosen.worst <= 8.0


def test_budget_uses_accuracy_when_the_samples_have_labels(tmp_path):
    paths, _ = _similar_pair(tmp_path)
    x = np.random.default_rng(3).random((N_CALIB, 1, 8, 8), dtype=np.float32)
    labels = B.run(paths[0], x)[0].argmax(1)  # task a's labels are its own predictions: accuracy 100%
    calib = B.calib_folder(tmp_path / "labelled", (1, 8, 8), n=N_CALIB, seed=3, labels=labels)
    result = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(budget=3.0))
    assert result.search.measure == ("accuracy", "accuracy")
    assert result.search.chosen.worst <= 3.0


@pytest.mark.parametrize("target", [4000, "21KB"])
def test_target_size_meets_the_size(tmp_path, target):
    paths, calib = _similar_pair(tmp_path)
    out = tmp_path / "m.onnx"
    result = merge(paths, calib, out, MergeOptions(target_size=target))
    value, unit = parse_size(target)
    assert (result.params_merged if unit == "params" else out.stat().st_size) <= value
    s = result.search
    assert s.mode == "target-size" and 1 <= len(s.probes) <= 5
    assert s.chosen.worst == min(p.worst for p in s.probes)  # the best of the allocations tried
    nets = [import_network(p) for p in paths]
    assert merged_params(nets, s.chosen.counts) == result.params_merged


@pytest.mark.slow
def test_target_size_counts_depthwise_kernels_and_slopes(tmp_path):
    """Depthwise kernels and PRelu slopes of shared channels are stored once: the size the search
    predicts (merged_params) is the written file's, and it meets the target."""
    pytest.importorskip("torch")
    paths = B.mobile_pair(tmp_path / "models", act="prelu", se=False)
    calib = B.calib_folder(tmp_path / "calib", B.MOBILE_SHAPE, n=500)
    nets = [import_network(p) for p in paths]
    target = int(0.8 * sum(n.params for n in nets))
    result = merge(paths, calib, tmp_path / "m.onnx", MergeOptions(target_size=target))
    assert result.params_merged <= target
    assert merged_params(nets, result.search.chosen.counts) == result.params_merged


def test_budget_errors(tmp_path):
    paths, calib = _similar_pair(tmp_path)
    with pytest.raises(OnnxZipError, match="below the fully shared model"):
        merge(paths, calib, tmp_path / "m.onnx", MergeOptions(target_size=100))
    with pytest.raises(OnnxZipError, match="not both"):
        MergeOptions(budget=1.0, target_size=100)
    with pytest.raises(OnnxZipError, match="--target-size must be"):
        MergeOptions(target_size="12 apples")
    small = B.calib_folder(tmp_path / "small", (1, 8, 8), n=90)
    with pytest.raises(OnnxZipError, match="hold out"):
        merge(paths, small, tmp_path / "m.onnx", MergeOptions(budget=1.0))
    assert not (tmp_path / "m.onnx").exists()


def test_input_scale_lets_models_with_different_scalings_share_one_input(tmp_path):
    """Model b was trained on (u - 0.5) / 0.5: --input-scale b=2,-1 makes the merged model take u for both."""
    wa, wb = B.mlp_weights([64, 32, 16, 10], 0), B.mlp_weights([64, 32, 16, 10], 1)
    a = B.save(B.mlp_model(wa), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(wb), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "calib", (1, 8, 8), n=128)
    out = tmp_path / "m.onnx"
    result = merge([a, b], calib, out, MergeOptions(share=0.0, input_scale=(("b", 2.0, -1.0),)))
    u = np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)
    ya, yb = B.run(out, u)
    np.testing.assert_allclose(ya, B.run(a, u)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yb, B.run(b, 2.0 * u - 1.0)[0], rtol=1e-4, atol=1e-4)
    assert all(c.top1_agreement == 1.0 for c in result.checks)  # measured against the scaled originals
    with pytest.raises(OnnxZipError, match=r"--input-scale names unknown task\(s\) c"):
        merge([a, b], calib, tmp_path / "x.onnx", MergeOptions(input_scale=(("c", 2.0, 0.0),)))


def test_cli_budget_prints_the_search_and_parses_input_scale(tmp_path):
    import subprocess
    import sys
    paths, calib = _similar_pair(tmp_path)
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxzip.cli.main", "merge", *map(str, paths), "--calib", str(calib),
                           "--budget", "3", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--budget: at most 3 points per task" in proc.stdout and out.exists()
    proc = subprocess.run([sys.executable, "-m", "onnxzip.cli.main", "merge", *map(str, paths), "--calib", str(calib),
                           "--input-scale", "b=2", "-o", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --input-scale b=2: give SCALE,OFFSET, e.g. b=0.00392157,0"]
    proc = subprocess.run([sys.executable, "-m", "onnxzip.cli.main", "merge", *map(str, paths), "--calib", str(calib),
                           "--budget-data", str(calib), "-o", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --budget-data is given but no share search is asked for (--budget or --target-size)"]
