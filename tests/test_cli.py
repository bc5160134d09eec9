"""The command line: merge with a report, inspect, split, and the README's demo command."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

import onnxzip

import builders as B

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "onnxzip.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_merge_report_inspect_split(tmp_path):
    layers = B.cnn_weights(0)
    a = B.save(B.cnn_model(layers), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp_path / "b.onnx")
    calib_a = B.calib_folder(tmp_path / "ca", (1, 12, 12), 96, seed=1)
    calib_b = B.calib_folder(tmp_path / "cb", (1, 12, 12), 96, seed=2)
    labels = np.random.default_rng(0).integers(0, 10, 64)
    ev = B.calib_folder(tmp_path / "ev", (1, 12, 12), 64, seed=3, labels=labels)
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    proc = _cli("merge", a, b, "--calib", f"a={calib_a}", "--calib", f"b={calib_b}", "-o", out, "--layout", "gated",
                "--share-layer", "conv1=4", "--share-layer", "conv2=0.5", "--share", "0.25", "--eval", f"b={ev}",
                "--report", report, "--solver", "greedy", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"conv1 .*6/6 .* 4 ", proc.stdout) and "fc1" in proc.stdout
    data = json.loads(report.read_text())
    assert [l["shared"] for l in data["layers"]] == [4, 4, 6, 0]
    assert data["checks"][1]["accuracy_merged"] is not None and data["checks"][0]["accuracy_merged"] is None
    assert data["plan"]["tasks"] == ["a", "b"]
    assert data["schema"] == 1 and data["onnxzip"] == onnxzip.__version__
    assert data["command"][:3] == ["onnxzip", "merge", str(a)] and "--report" in data["command"]
    assert data["options"]["share"] == 0.25 and data["options"]["layout"] == "gated"
    assert data["options"]["share_layers"] == [["conv1", 4], ["conv2", 0.5]]
    assert data["models"]["a"]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert data["models"]["b"]["file"] == "b.onnx" and data["models"]["b"]["input"]["shape"]

    proc = _cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "layout gated" in proc.stdout and "task b:" in proc.stdout and "1,542 params" in proc.stdout

    x = np.random.default_rng(4).random((5, 1, 12, 12), dtype=np.float32)
    merged_b = B.run(out, x, {"task": np.array(1, np.int64)})[0]
    proc = _cli("split", out, "--task", "b", "-o", tmp_path / "b_only.onnx")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(B.run(tmp_path / "b_only.onnx", x)[0], merged_b, rtol=1e-5, atol=1e-5)
    proc = _cli("split", out, "--task", "zzz", "-o", tmp_path / "z.onnx")
    assert proc.returncode == 2 and "no task 'zzz'" in proc.stderr


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.startswith("#")]


# The engine's heavy dependencies: a command loads them when it runs, --help and --version never.
HEAVY_MODULES = ("onnx", "onnxruntime", "scipy", "torch", "onnx_graphsurgeon")


def test_help_and_version_load_no_engine():
    probe = ("import runpy, sys\n"
             "sys.argv = ['onnxzip'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('onnxzip.cli.main', run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             f"print('LOADED', [m for m in {HEAVY_MODULES!r} if m in sys.modules], code)\n")
    for args in (["--version"], ["--help"], ["merge", "--help"], ["retrain", "--help"], ["inspect", "--help"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "LOADED [] 0", (args, proc.stdout[-300:])
    assert _cli("--version").stdout.startswith("onnxzip ")


def test_choices_are_listed_in_help_and_the_two_layouts_are_apart():
    wide = {**os.environ, "COLUMNS": "200"}  # one line per option: nothing wraps inside a metavar
    merge_help = _cli("merge", "--help", env=wide).stdout
    for shown in ("<multi|gated>", "<NCHW|NHWC>", "<hessian|l2|correlation|random>", "<optimal|greedy>",
                  "<auto|cpu|cuda>", "<all|early>", "DIR|TASK=DIR", "NAME=SHARE"):
        assert shown in merge_help, shown
    assert "list[str]" not in merge_help
    assert "<auto|labels|distill|mix>" in _cli("retrain", "--help", env=wide).stdout
    proc = _cli("merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--calib", "c", "--layout", "NCHW")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "'NCHW' is not one of 'multi', 'gated'" in proc.stderr


def test_quantize_command_prints_each_task_and_keeps_the_layout(tmp_path):
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "c", (1, 12, 12), 48, seed=1)
    merged, q = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert _cli("merge", a, b, "--calib", calib, "-o", merged, "--layout", "gated", "--share", "0.5").returncode == 0
    proc = _cli("quantize", merged, "--calib", calib, "-o", q, "--mode", "dynamic", "--samples", "32")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\ba\s.*\b32\b.*%", proc.stdout) and "int8 dynamic, layout gated" in proc.stdout
    proc = _cli("inspect", q)
    assert proc.returncode == 0 and "layout gated" in proc.stdout
    bad = _cli("quantize", merged, "--calib", calib, "-o", q, "--mode", "int4")
    assert bad.returncode == 2 and "'int4' is not one of 'static', 'dynamic'" in bad.stderr
    qop = tmp_path / "m.qop.onnx"
    proc = _cli("quantize", merged, "--calib", calib, "-o", qop, "--format", "qoperator", "--samples", "32")
    assert proc.returncode == 0 and "int8 static, qoperator, layout gated" in proc.stdout, proc.stderr
    assert "WARNING" not in proc.stderr  # ONNX Runtime's quantizer advice is held back
    assert "QLinearConv" in {n.op_type for n in B.all_nodes(onnx.load(str(qop)).graph)}
    assert _cli("split", qop, "--task", "a", "-o", tmp_path / "a.int8.onnx").returncode == 0
    bad = _cli("quantize", merged, "--calib", calib, "-o", qop, "--mode", "dynamic", "--format", "qoperator")
    assert bad.returncode == 2 and "--format is for --mode static" in bad.stderr


def test_readme_main_job_runs_as_written():
    """The README's first command (install, demo data, the real merge) runs exactly as written."""
    main_job = _readme_commands()[0]
    steps = [s.strip() for s in main_job.split("&&")]
    assert steps[0].startswith("pip install") and any(s.startswith("onnxzip merge") for s in steps)
    assert "../shared" not in main_job
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(main_job, shell=True, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy merged" in proc.stdout and (REPO / "demo" / "merged.onnx").exists()


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == _readme_commands()[1]


def test_merge_with_png_calibration_images(tmp_path):
    from PIL import Image
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp_path / "b.onnx")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(images / f"{i:03d}.png")
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", images, "--resize", "12x12", "--mean", "0.5", "--std", "0.25",
                "--image-layout", "NCHW", "--share", "0.5", "-o", out, "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\|\s+a\s+\|\s+24\s+\|", proc.stdout.replace("│", "|")), proc.stdout
    proc = _cli("merge", a, b, "--calib", images, "--resize", "12", "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "--resize" in proc.stderr and not (tmp_path / "x.onnx").exists()


def test_split_multi_layout_and_inspect_foreign_model(tmp_path):
    a = B.save(B.mlp_model(B.mlp_weights([64, 16, 8, 10], 0)), tmp_path / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights([64, 16, 8, 3], 1)), tmp_path / "b.onnx")
    out = tmp_path / "m.onnx"
    assert _cli("merge", a, b, "--calib", B.calib_folder(tmp_path / "c", (1, 8, 8), 64), "-o", out).returncode == 0
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    merged = B.run(out, x)
    for t, task in enumerate("ab"):
        part = tmp_path / f"{task}_only.onnx"
        assert _cli("split", out, "--task", task, "-o", part).returncode == 0
        y = B.run(part, x)
        assert len(y) == 1 and y[0].shape == merged[t].shape
        np.testing.assert_allclose(y[0], merged[t], rtol=1e-6, atol=1e-6)
    proc = _cli("inspect", a)
    assert proc.returncode == 2 and "not a model written by onnxzip" in proc.stderr


def test_merge_quantize_on_the_command_line(tmp_path):
    """merge --quantize dynamic prints the quantization table and writes NAME.int8.onnx; a mode it does not
    know is a usage error (exit 2) that writes nothing."""
    a = B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "a.onnx")
    b = B.save(B.cnn_model(B.cnn_weights(1)), tmp_path / "b.onnx")
    calib = B.calib_folder(tmp_path / "c", (1, 12, 12), 48)
    out = tmp_path / "m.onnx"
    proc = _cli("merge", a, b, "--calib", calib, "-o", out, "--quantize", "dynamic")
    assert proc.returncode == 0, proc.stderr
    assert "onnxzip quantize -> " in proc.stdout and "int8 dynamic" in proc.stdout
    assert out.is_file() and (tmp_path / "m.int8.onnx").is_file()
    proc = _cli("merge", a, b, "--calib", calib, "-o", tmp_path / "n.onnx", "--quantize", "int4")
    assert proc.returncode == 2 and "int4" in proc.stderr and not (tmp_path / "n.onnx").exists()
