"""The recipe's two training artefacts: mined negatives and teacher scores. One writer and one reader
each; mining and teacher scoring write them, training (stages 4 and 5, the reranker) reads them.

negatives.jsonl  one row per query with negatives: {"qid", "neg_dids": [did, ...], "n_candidates"}
no_negatives.jsonl  the queries left without any: {"qid", "task", "positives_in_topk", ...}
teacher.jsonl    one row per sampled query: {"qid", "task", "weight", "candidates": [did, ...],
                 "cos": [float], "p_yes": [float], "scores": [float]} (scores = cos + weight * p_yes)
teacher_quality.json  beside teacher.jsonl: how the teacher's ranking compares with cos alone on its
                 queries' labelled positives (teacher/quality.py); stage 5's gate reads it

Rows are sorted by the writer's caller; a reader given a directory reads the file inside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from umarvel_ray.data.jsonl import read_records
from umarvel_ray.io import atomic_write_lines

NEGATIVES_FILE = "negatives.jsonl"
NO_NEGATIVES_FILE = "no_negatives.jsonl"
TEACHER_FILE = "teacher.jsonl"
TEACHER_QUALITY_FILE = "teacher_quality.json"


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    return (json.dumps(r) + "\n" for r in rows)


def negatives_file(path: str | os.PathLike[str]) -> Path:
    """The negatives jsonl: `path` itself, or `path/negatives.jsonl` when `path` is a directory."""
    p = Path(path)
    return p / NEGATIVES_FILE if p.is_dir() else p


def teacher_file(path: str | os.PathLike[str]) -> Path:
    """The teacher jsonl: `path` itself, or `path/teacher.jsonl` when `path` is a directory."""
    p = Path(path)
    return p / TEACHER_FILE if p.is_dir() else p


def write_negatives(
    out_dir: Path, records: Iterable[Mapping[str, Any]], empty: Iterable[Mapping[str, Any]]
) -> Path:
    """negatives.jsonl (`records`) and no_negatives.jsonl (`empty`) in `out_dir`, atomically.
    Returns the negatives file's path."""
    path = atomic_write_lines(out_dir / NEGATIVES_FILE, _jsonl(records))
    atomic_write_lines(out_dir / NO_NEGATIVES_FILE, _jsonl(empty))
    return path


def read_negatives(path: str | os.PathLike[str], limit: int = 0) -> dict[str, list[str]]:
    """negatives.jsonl (a file or its directory) -> {qid: neg_dids}, in file order.

    Raises ValueError naming FILE:LINE for a malformed row or one without `qid` / a list `neg_dids`.
    """
    p = negatives_file(path)
    out: dict[str, list[str]] = {}
    for n, rec in enumerate(read_records(p, limit), 1):
        negs = rec.get("neg_dids")
        if "qid" not in rec or not isinstance(negs, list):
            raise ValueError(f"{p}:{n}: field 'neg_dids': expected {{qid, neg_dids: [did, ...]}}, got {rec!r}")
        out[str(rec["qid"])] = [str(d) for d in negs]
    return out


def write_teacher(out_dir: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """teacher.jsonl in `out_dir`, atomically; returns its path."""
    return atomic_write_lines(out_dir / TEACHER_FILE, _jsonl(records))


def read_teacher_rows(path: str | os.PathLike[str], limit: int = 0) -> list[dict[str, Any]]:
    """teacher.jsonl (a file or its directory) rows in file order (the first `limit` when > 0).

    Raises ValueError naming FILE and row for a malformed row, or one whose `candidates` and
    `scores` are empty or of different lengths.
    """
    p = teacher_file(path)
    rows = read_records(p, limit)
    for n, r in enumerate(rows, 1):
        cands, scores = r.get("candidates") or [], r.get("scores") or []
        if len(cands) != len(scores) or not cands:
            raise ValueError(f"{p}: row {n}: candidates and scores must be non-empty and equal length")
    return rows


def read_teacher(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """teacher.jsonl (a file or its directory) -> {qid: row}, rows as written (not checked)."""
    return {str(r["qid"]): r for r in read_records(teacher_file(path))}


def write_teacher_quality(out_dir: Path, quality: Mapping[str, Any]) -> Path:
    """teacher_quality.json in `out_dir` (beside teacher.jsonl), atomically; returns its path."""
    from umarvel_ray.io import atomic_write_json

    path = out_dir / TEACHER_QUALITY_FILE
    atomic_write_json(path, dict(quality))
    return path


def read_teacher_quality(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The quality record beside teacher.jsonl (`path`: the file or its directory); None when the
    teacher was written without one."""
    from umarvel_ray.io import read_json_or_none

    return read_json_or_none(teacher_file(path).with_name(TEACHER_QUALITY_FILE))


__all__ = [
    "NEGATIVES_FILE",
    "NO_NEGATIVES_FILE",
    "TEACHER_FILE",
    "TEACHER_QUALITY_FILE",
    "negatives_file",
    "read_negatives",
    "read_teacher",
    "read_teacher_quality",
    "read_teacher_rows",
    "teacher_file",
    "write_negatives",
    "write_teacher",
    "write_teacher_quality",
]
