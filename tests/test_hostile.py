"""Hostile and careless use of the command line: every refusal is one line and exit 2, before any
work, with no output, temp file or cache left and every input byte-identical; outputs never
overwrite inputs; signals clean up; written files get the umask's permissions.

Cases of the model and data loaders and of the merged-file reader live beside their modules'
tests (test_load.py, test_calib.py, test_merged.py); this module covers the command line's own
promises and one case of each of those classes end to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import builders as B
from hostile import CLI_TIMEOUT_S, SHAPE, Case, assert_refused, digest, make_case, temp_leftovers
from onnxzip.scratch import LOCK_NAME

# A merge slow enough (batch size 1, 2000 samples: about 8 s) to be caught in the middle by a signal.
SLOW_SAMPLES = 2000
SLOW_SHAPE = (1, 12, 12)
POLL_S = 0.05


@pytest.fixture
def case(tmp_path) -> Case:
    return make_case(tmp_path / "case")


def _inputs(case: Case) -> dict[str, str]:
    return digest([case.a, case.b, case.calib])


# --- data loss: no output may name a file the command reads ------------------------------------

def test_report_over_an_input_model_is_refused(case):
    before, out = _inputs(case), case.root / "m.onnx"
    proc = case.merge("-o", out, "--report", case.a)
    assert_refused(proc, "--report", "a.onnx", "input model", outputs=[out], folders=[case.root, case.scratch],
                   before=before)


def test_output_over_a_calibration_file_is_refused(case):
    before, target = _inputs(case), case.calib / "part0.npz"
    proc = case.merge("-o", target)
    assert_refused(proc, "-o", "part0.npz", "--calib data", folders=[case.calib, case.scratch], before=before)


def test_output_through_a_symlink_or_hard_link_to_an_input_is_refused(case):
    before = _inputs(case)
    (case.root / "link.onnx").symlink_to(case.a)
    os.link(case.b, case.root / "hard.onnx")
    for target in ("link.onnx", "hard.onnx"):
        proc = case.merge("-o", case.root / target)
        assert_refused(proc, "-o", target, "would overwrite", folders=[case.root], before=before)


def test_output_and_report_naming_one_file_is_refused(case):
    out = case.root / "m.onnx"
    proc = case.merge("-o", out, "--report", case.root / "sub" / ".." / "m.onnx")
    assert_refused(proc, "-o", "--report", "same file", outputs=[out])


def test_output_whose_data_file_is_an_input_external_data_file_is_refused(case):
    """-o out.onnx may write out.onnx.data beside it; a model reading that file is protected."""
    model = B.mlp_model(B.mlp_weights([64, 16, 10], 2))
    onnx.save(model, str(case.root / "ext.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    before = digest([case.root / "ext.onnx", case.root / "m.onnx.data"])
    proc = case.cli("merge", case.a, case.root / "ext.onnx", "--calib", case.calib, "-o", case.root / "m.onnx")
    assert_refused(proc, "m.onnx.data", "external data of ext.onnx", outputs=[case.root / "m.onnx"],
                   folders=[case.root], before=before)
    proc = case.cli("merge", case.a, case.root / "ext.onnx", "--calib", case.calib, "-o", case.root / "m.onnx.data")
    assert_refused(proc, "external data of ext.onnx", folders=[case.root], before=before)


# --- preflight: bad output paths fail before any work ------------------------------------------

@pytest.mark.parametrize("target", [".", "calib", "calib/"])
def test_output_that_is_a_folder_is_refused(case, target):
    proc = case.merge("-o", target, cwd=case.root)
    assert_refused(proc, "-o", "is a folder", folders=[case.root, case.calib], before=_inputs(case))


def test_output_under_a_file_is_refused(case):
    proc = case.merge("-o", case.a / "m.onnx")
    assert_refused(proc, "-o", "not a folder", before=_inputs(case))


def test_report_into_a_missing_folder_is_created(case):
    out, report = case.root / "m.onnx", case.root / "new" / "deeper" / "r.json"
    proc = case.merge("-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and report.is_file()


def _can_mount() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m)")


MOUNT_LISTING = "--- left on the mount:"


def _cli_on_mount(case: Case, options: str, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI in a private mount namespace with a tmpfs mounted (OPTIONS) at case.root/'mnt';
    returns the run and what it left on the mount (listed before the namespace goes)."""
    mnt = case.root / "mnt"
    mnt.mkdir(exist_ok=True)
    cmd = " ".join([f"mount -t tmpfs -o {options} tmpfs {mnt} &&", sys.executable, "-m", "onnxzip.cli.main",
                    *map(str, args), f"; rc=$?; echo '{MOUNT_LISTING}'; ls -A {mnt}; exit $rc"])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=case.env(),
                          timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    return proc, proc.stdout.split(MOUNT_LISTING)[-1].split()


@needs_mount
def test_output_on_a_read_only_disk_is_refused_before_any_work(case):
    mnt = case.root / "mnt"
    for flag in ("-o", "--report"):
        args = ["-o", mnt / "m.onnx"] if flag == "-o" else ["-o", case.root / "m.onnx", "--report", mnt / "r.json"]
        proc, _ = _cli_on_mount(case, "ro,size=1m", "merge", case.a, case.b, "--calib", case.calib, *args)
        assert_refused(proc, flag, "Read-only file system", outputs=[case.root / "m.onnx"],
                       folders=[case.root], before=_inputs(case))
        assert "layer" not in proc.stdout  # refused before the merge table


@needs_mount
def test_output_on_a_full_disk_leaves_nothing(case):
    """A disk that fills up while writing: one line, exit 2, no file at the final path or beside it."""
    big = make_case(case.root / "big", widths=(64, 2048, 10))  # a 0.5 MB model on a 64 kB disk
    proc, left = _cli_on_mount(big, "size=64k", "merge", big.a, big.b, "--calib", big.calib, "-o",
                               big.root / "mnt" / "m.onnx")
    line = assert_refused(proc, "m.onnx", "No space left on device", folders=[big.scratch])
    assert "cannot write" in line and left == [], left
    # the report fills the disk after the model was written: the model goes too (all or nothing)
    out = big.root / "m.onnx"
    proc, left = _cli_on_mount(big, "size=8k", "merge", big.a, big.b, "--calib", big.calib, "-o", out,
                               "--report", big.root / "mnt" / "r.json")
    assert_refused(proc, "r.json", "No space left on device", outputs=[out], folders=[big.root, big.scratch])
    assert left == [], left


# --- bad values accepted silently before ----------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3"])
def test_verify_samples_below_one_is_refused(case, value):
    out = case.root / "m.onnx"
    assert_refused(case.merge("-o", out, "--verify-samples", value), "--verify-samples", outputs=[out],
                   folders=[case.root, case.scratch])


@pytest.mark.parametrize("label", [10, 57, -1])
def test_eval_labels_outside_the_model_classes_are_refused(case, label):
    labels = np.arange(16) % 10
    labels[5] = label
    ev = B.calib_folder(case.root / "ev", SHAPE, 16, labels=labels, files=1)
    out = case.root / "m.onnx"
    proc = case.merge("-o", out, "--eval", f"a={ev}")
    assert_refused(proc, "part0.npz", str(label), outputs=[out], folders=[case.root, case.scratch],
                   before=digest([ev]))


def test_regression_output_is_reported_by_relative_error_only(tmp_path):
    case = make_case(tmp_path / "reg", widths=(64, 16, 1))
    out = case.root / "m.onnx"
    proc = case.merge("-o", out, "--report", case.root / "r.json")
    assert proc.returncode == 0, proc.stderr
    import json
    checks = json.loads((case.root / "r.json").read_text())["checks"]
    assert [c["top1_agreement"] for c in checks] == [None, None]
    assert all(c["rel_output_error"] >= 0 for c in checks)
    ev = B.calib_folder(case.root / "ev", SHAPE, 16, labels=np.zeros(16, np.int64), files=1)
    assert_refused(case.merge("-o", case.root / "m2.onnx", "--eval", f"a={ev}"), "--eval", "not [N, classes]")


# --- usage errors: one line and a hint ----------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--no-such-flag"], "--no-such-flag"),
    (["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--share", "lots"], "--share"),
    (["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--batch-size", "1.5"], "--batch-size"),
    (["split", "--task", "a", "-o", "x.onnx"], "Missing argument"),
    (["merge", "a.onnx", "b.onnx"], "-o"),
    (["frobnicate"], "frobnicate"),
])
def test_usage_errors_take_one_line(case, args, needle):
    proc = case.cli(*args, cwd=case.root)
    line = assert_refused(proc, needle)
    assert "--help" in line and "╭" not in proc.stderr


# --- output files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_permissions(case, umask):
    out, report, part = case.root / "m.onnx", case.root / "r.json", case.root / "a_only.onnx"
    env = case.env()
    script = (f"import os, sys; os.umask({umask}); sys.argv[0] = 'onnxzip'; "
              "from onnxzip.cli.main import main; main()")

    def run(*args):
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=CLI_TIMEOUT_S)
    assert run("merge", case.a, case.b, "--calib", case.calib, "-o", out, "--report", report).returncode == 0
    assert run("split", out, "--task", "a", "-o", part).returncode == 0
    for path in (out, report, part):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, (path, oct(path.stat().st_mode))


def test_identical_inputs_give_byte_identical_outputs(case):
    outs = [case.root / "m1.onnx", case.root / "m2.onnx"]
    for out in outs:
        assert case.merge("-o", out, "--layout", "gated").returncode == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_no_telemetry_is_written_under_home(case):
    assert case.merge("-o", case.root / "m.onnx").returncode == 0
    assert not list(case.home.rglob("*")), list(case.home.rglob("*"))


def test_outputs_above_the_protobuf_limit_are_written_with_external_data(case, monkeypatch):
    """Above the limit the model is NAME + NAME.data, checked in a temporary folder, then renamed.

    With every limit at 0 the whole pipeline takes its large-model paths: calibration and
    verification sessions through external data, the emitted model checked from its file."""
    from onnxzip import emit, runtime, save
    from onnxzip.api import merge
    small = merge([case.a, case.b], case.calib, case.root / "small.onnx")
    for module, name in ((save, "EXTERNAL_DATA_ABOVE"), (emit, "EXTERNAL_DATA_ABOVE"), (runtime, "INLINE_MODEL_LIMIT")):
        monkeypatch.setattr(module, name, 0)
    big_path = case.root / "big.onnx"
    big = merge([case.a, case.b], case.calib, big_path)
    data = case.root / "big.onnx.data"
    assert data.is_file() and big.bytes_merged == big_path.stat().st_size + data.stat().st_size
    model = onnx.load(str(big_path), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    x = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    for got, want in zip(B.run(big_path, x), B.run(case.root / "small.onnx", x)):
        np.testing.assert_array_equal(got, want)
    assert not temp_leftovers([case.root]) and small.params_merged == big.params_merged


# --- signals ------------------------------------------------------------------------------------------

def _slow_case(root: Path) -> Case:
    case = make_case(root)
    for p, seed in ((case.a, 0), (case.b, 1)):
        B.save(B.cnn_model(B.cnn_weights(seed)), p)
    shutil.rmtree(case.calib)
    B.calib_folder(case.calib, SLOW_SHAPE, SLOW_SAMPLES)
    return case


def _start_slow_merge(case: Case, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "onnxzip.cli.main", "merge", case.a, case.b, "--calib",
                             case.calib, "-o", out, "--batch-size", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=case.env(), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    # The calibration cache, once locked (a folder killed before its lock exists is taken for an
    # orphan only after scratch.UNLOCKED_GRACE_S): the zip is under way.
    while not any((d / LOCK_NAME).exists() for d in case.scratch.glob("onnxzip-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(POLL_S)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_temp_files_and_caches(tmp_path, signum):
    case, out = _slow_case(tmp_path / "slow"), tmp_path / "slow" / "m.onnx"
    proc = _start_slow_merge(case, out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and not temp_leftovers([case.root, case.scratch])


@pytest.mark.slow
def test_caches_orphaned_by_sigkill_are_removed_by_the_next_run(tmp_path):
    case, out = _slow_case(tmp_path / "slow"), tmp_path / "slow" / "m.onnx"
    proc = _start_slow_merge(case, out)
    proc.kill()
    proc.communicate(timeout=CLI_TIMEOUT_S)
    orphans = list(case.scratch.glob("onnxzip-*"))
    assert orphans and not out.exists()
    stale = case.root / ".m.onnx.abc123.tmp"  # a temp file beside the output, as a killed save leaves it
    stale.write_bytes(b"partial")
    small = make_case(tmp_path / "next")
    proc = subprocess.run([sys.executable, "-m", "onnxzip.cli.main", "merge", small.a, small.b, "--calib",
                           small.calib, "-o", out], capture_output=True, text=True, env=case.env(),
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert not any(o.exists() for o in orphans) and not stale.exists() and out.is_file()


# --- split and retrain outputs ---------------------------------------------------------------------

@pytest.fixture
def merged(case) -> Path:
    out = case.root / "m.onnx"
    assert case.merge("-o", out).returncode == 0
    return out


def test_split_over_the_merged_model_is_refused(case, merged):
    before = digest([merged])
    assert_refused(case.cli("split", merged, "--task", "a", "-o", merged), "-o", "the merged model",
                   folders=[case.root], before=before)
    link = case.root / "alias.onnx"
    link.symlink_to(merged)
    assert_refused(case.cli("split", merged, "--task", "a", "-o", link), "would overwrite", before=before)


def test_split_over_the_merged_model_external_data_is_refused(case, merged):
    model = onnx.load(str(merged))
    ext = case.root / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, location="part.onnx.data", size_threshold=0)
    before = digest([ext, case.root / "part.onnx.data"])
    proc = case.cli("split", ext, "--task", "b", "-o", case.root / "part.onnx")
    assert_refused(proc, "part.onnx.data", "external data of ext.onnx", outputs=[case.root / "part.onnx"],
                   before=before)


@pytest.mark.parametrize("target", ["a.onnx", "calib/part1.npz"])
def test_retrain_over_a_teacher_or_its_data_is_refused(case, merged, target):
    pytest.importorskip("torch")
    before = digest([case.a, case.b, case.calib, merged])
    proc = case.cli("retrain", merged, "--data", case.calib, "--iters", "2", "-o", case.root / target)
    assert_refused(proc, "-o", "would overwrite", folders=[case.root, case.scratch], before=before)


# --- one case of each loader class, end to end (the rest: test_calib, test_load, test_merged) ------

def test_calibration_header_declaring_a_billion_samples_is_refused(case):
    """The .npz member declares 1e9 samples but stores 4; reading it once ended in a MemoryError."""
    import io
    import zipfile
    bad = case.root / "bomb"
    bad.mkdir()
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**9, *SHAPE)})
    member.write(np.zeros((4, *SHAPE), np.float32).tobytes())
    with zipfile.ZipFile(bad / "x.npz", "w") as zf:
        zf.writestr("input.npy", member.getvalue())
    out = case.root / "m.onnx"
    proc = case.cli("merge", case.a, case.b, "--calib", bad, "-o", out)
    assert_refused(proc, "x.npz", "1000000000", outputs=[out], folders=[case.root, case.scratch])


def test_png_decompression_bomb_is_refused(case):
    from PIL import Image
    bombs = case.root / "png"
    bombs.mkdir()
    Image.new("L", (12000, 12000)).save(bombs / "bomb.png", optimize=True)  # 144 Mpixel, a few kB
    out = case.root / "m.onnx"
    proc = case.cli("merge", case.a, case.b, "--calib", bombs, "--resize", "8x8", "-o", out)
    assert_refused(proc, "bomb.png", outputs=[out], folders=[case.root, case.scratch])
