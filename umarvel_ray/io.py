"""Atomic file writes and file fingerprints: the one owner of "readers never see half a file".

Every artefact the jobs write (manifests, negatives, teacher scores, reports, index metadata)
goes through a temp file in the same directory plus `os.replace`, which POSIX makes atomic on one
file system: a reader (or a resumed job) sees the old file or the new one, never a torn one.
The temp name carries the pid so that two processes writing the same path do not share a temp.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a temp file + rename; creates the parent directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def write_if_changed(path: str | os.PathLike[str], data: bytes) -> bool:
    """`atomic_write_bytes` unless the file already holds exactly `data` (its mtime is then kept,
    so fingerprints that include mtimes stay valid). Returns whether it wrote."""
    target = Path(path)
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return False
    atomic_write_bytes(target, data)
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_lines(path: str | os.PathLike[str], lines: Iterable[str | bytes]) -> Path:
    """Stream `lines` (already newline-terminated) to `path` through a temp file + rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    with tmp.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
    os.replace(tmp, target)
    return target


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Pretty JSON (sorted keys, 2-space indent, trailing newline; non-JSON values via `str`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON at `path`, or None when it is missing or unreadable (a torn or absent marker)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks (inputs' identity in fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_signature(
    directory: str | os.PathLike[str] | None, *more: str | os.PathLike[str]
) -> str | None:
    """16 hex chars over the names, sizes and mtimes of a directory's top-level files (then of each
    of `more`, in order, in the same hash: a model and its adapter).

    A cheap identity of model weights (hashing GBs of safetensors on every job start would not be);
    None for no directory.
    """
    if not directory:
        return None
    h = hashlib.sha256()
    for d in (directory, *more):
        for p in sorted(Path(d).iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_lines",
    "atomic_write_text",
    "dir_signature",
    "file_sha256",
    "read_json_or_none",
    "write_if_changed",
]
