"""Before any work: every output can be written and is none of the files a command reads.

Paths are compared after resolving symlinks and relative parts, and existing files also by
device and inode (a hard link is the same file). A model output is compared together with the
external-data file a save may create beside it (save.data_file).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import OnnxZipError
from .load import external_data_files
from .save import data_file

PROBE_PREFIX = ".onnxzip-probe."
FOLDER_NAMES = ("", ".", "..")


@dataclass(frozen=True)
class Read:
    """A file or folder a command reads; a folder stands for itself and every entry in it."""

    path: Path
    what: str  # how messages name it: 'input model', '--calib data', ...


@dataclass(frozen=True)
class Output:
    """A file a command writes, and the option that names it."""

    path: Path
    flag: str
    model: bool = True  # a model may bring an external-data file beside it


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: the resolved path, and device and inode where it exists."""
    resolved = path.resolve()
    try:
        st = resolved.stat()
        return (str(resolved), (st.st_dev, st.st_ino))
    except OSError:
        return (str(resolved), None)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _read_files(reads: Iterable[Read]) -> list[tuple[tuple, Path, str]]:
    """(identity, path, what) of every file read, folders expanded one level (as the loaders list them)."""
    files = []
    for r in reads:
        path = Path(r.path)
        entries = [path]
        if path.is_dir():
            try:
                entries += sorted(path.iterdir())
            except OSError:
                pass
        files += [(_identity(p), p, r.what) for p in entries]
    return files


def _written(out: Output) -> list[Path]:
    return [out.path, data_file(out.path)] if out.model else [out.path]


def _check_distinct(outputs: Sequence[Output]) -> None:
    seen: list[tuple[tuple, Output]] = []
    for out in outputs:
        for path in _written(out):
            ident = _identity(path)
            for other_ident, other in seen:
                if other is not out and _same(ident, other_ident):
                    raise OnnxZipError(f"{out.flag} {out.path} and {other.flag} {other.path} name the same file")
            seen.append((ident, out))


def _check_not_read(out: Output, files: list[tuple[tuple, Path, str]]) -> None:
    for path in _written(out):
        ident = _identity(path)
        for read_ident, read_path, what in files:
            if _same(ident, read_ident):
                also = "" if path == out.path else f" (its external-data file {path.name})"
                raise OnnxZipError(f"{out.flag} {out.path}{also} would overwrite {what} {read_path}; "
                                   "choose another path")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_file_path(out: Output, given: str) -> None:
    """The output names a file: not a folder, not a device or other special file."""
    path = out.path
    if path.name in FOLDER_NAMES or given.endswith(os.sep) or path.is_dir():
        raise OnnxZipError(f"{out.flag} {given}: is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise OnnxZipError(f"{out.flag} {given}: exists and is not a regular file")


def _check_writable(out: Output) -> None:
    """The output's folder exists (or can be created) and this process can create files in it."""
    path = out.path
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise OnnxZipError(f"{out.flag} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OnnxZipError(f"{out.flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def model_reads(path: Path, what: str) -> list[Read]:
    """A model file and the external-data files it names, as reads (OnnxZipError if it cannot be read)."""
    return [Read(Path(path), what)] + [Read(f, f"external data of {Path(path).name}")
                                        for f in external_data_files(path)]


def check_outputs(outputs: Sequence[Output], reads: Iterable[Read]) -> None:
    """Refuse, before any work, outputs that cannot be written, that name one file twice, or that
    would overwrite anything the command reads (the message names the option and both files)."""
    for out in outputs:
        _check_file_path(out, str(out.path))
    files = _read_files(reads)
    _check_distinct(outputs)
    for out in outputs:
        _check_not_read(out, files)
        _check_writable(out)
