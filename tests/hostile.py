"""Harness for hostile-input tests: run the CLI in a private temp folder and check that a refusal
kept every promise (exit 2, one stderr line, no traceback, no output or temp file, inputs untouched)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import builders as B

SHAPE = (1, 8, 8)
USER_ERROR = 2
# A refusal must come well before any real work: the tiny test merges take about a second.
CLI_TIMEOUT_S = 120


@dataclass
class Case:
    """A pair of good models, a calibration folder and a private TMPDIR/HOME, all under ``root``."""

    root: Path
    a: Path
    b: Path
    calib: Path
    scratch: Path
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI run: temp files and ONNX Runtime's home folder inside the case."""
        return {**os.environ, "TMPDIR": str(self.scratch), "HOME": str(self.home), **extra}

    def cli(self, *args, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        """Run `onnxzip ARGS` as a user would (a fresh process), capturing its output."""
        return subprocess.run([sys.executable, "-m", "onnxzip.cli.main", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd, env=self.env(**env), timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)

    def merge(self, *args, **env: str) -> subprocess.CompletedProcess:
        """`onnxzip merge a b --calib C ARGS`."""
        return self.cli("merge", self.a, self.b, "--calib", self.calib, *args, **env)


def make_case(root: Path, widths=(64, 16, 10)) -> Case:
    """Two small MLPs (different seeds), 48 calibration samples and empty scratch/home folders."""
    root.mkdir(parents=True, exist_ok=True)
    a = B.save(B.mlp_model(B.mlp_weights(list(widths), 0)), root / "a.onnx")
    b = B.save(B.mlp_model(B.mlp_weights(list(widths), 1)), root / "b.onnx")
    calib = B.calib_folder(root / "calib", SHAPE, 48)
    scratch, home = root / "scratch", root / "home"
    scratch.mkdir()
    home.mkdir()
    return Case(root, a, b, calib, scratch, home)


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """SHA-256 of every file at or under the paths (a byte-for-byte snapshot of the inputs)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in Path(p).rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def temp_leftovers(folders: Sequence[Path]) -> list[Path]:
    """Temporary files and caches onnxzip may have left: hidden '.NAME.*.tmp' files and 'onnxzip-*' entries."""
    left = []
    for folder in folders:
        if folder.is_dir():
            left += [p for p in folder.iterdir() if p.name.startswith("onnxzip-") or
                     (p.name.startswith(".") and p.name.endswith(".tmp"))]
    return left


def assert_refused(proc: subprocess.CompletedProcess, *needles: str, outputs: Sequence[Path] = (),
                   folders: Sequence[Path] = (), before: dict[str, str] | None = None) -> str:
    """Exit 2, exactly one stderr line starting 'error: ' that contains every needle, no traceback, none
    of ``outputs`` exists, no temp file or cache in ``folders``, and the files of ``before`` unchanged.
    Returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == USER_ERROR, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    for out in outputs:
        assert not out.exists(), out
    assert not temp_leftovers(folders), temp_leftovers(folders)
    if before is not None:
        assert digest(Path(p) for p in before) == before, "an input file changed"
    return lines[0]
