"""Lines of the M-BEIR jsonl files by byte range: the re-ranker's decode tasks read only the queries
and retrieved candidates they score, where a scan found them (`scan_offsets`), not whole files."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_at(f: Any, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the open binary file `f` (one jsonl line, by its byte range)."""
    f.seek(int(offset))
    return f.read(int(length))


def scan_offsets(path: Path, wanted: set[str], id_key: str = "did") -> dict[str, tuple[int, int]]:
    """id -> (byte offset, byte length) of its line's content (`data.jsonl` lines), for the ids in
    `wanted` (first occurrence)."""
    from umarvel_ray.data.jsonl import iter_file_lines, parse_json

    out: dict[str, tuple[int, int]] = {}
    for ln in iter_file_lines(path):
        if ln.blank:
            continue
        obj, _ = parse_json(ln.content)  # a malformed line has no id; the embedding job rejects it
        rid = obj.get(id_key) if isinstance(obj, dict) else None
        if rid in wanted and rid not in out:
            out[rid] = (ln.start, len(ln.content))
            if len(out) == len(wanted):
                break
    return out
