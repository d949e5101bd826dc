"""M-BEIR jsonl and qrels writers (the toy generator, the importer, tests).

Every record written is checked by the same functions the readers use (`mbeir.check_*`,
`mbeir.parse_qrels_line`), so whatever these write reads back and validates. The instruction
tsv's writer is `instructions.write_instructions`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from umarvel_ray.data.mbeir import (
    POOL_FIELDS,
    QUERY_FIELDS,
    MBEIRFormatError,
    check_pool_record,
    check_query_record,
    parse_qrels_line,
    raise_first,
    split_id,
)


def _rows(rows: Iterable[Mapping[str, Any]] | pa.Table) -> Iterable[Mapping[str, Any]]:
    return rows.to_pylist() if isinstance(rows, pa.Table) else rows


def _write_jsonl(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]] | pa.Table,
    fields: tuple[str, ...],
    defaults: Mapping[str, Any],
    check: Any,
    id_field: str,
) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for n, row in enumerate(_rows(rows), start=1):
            rec = {}
            for k in fields:
                if k in row and row[k] is not None:
                    rec[k] = row[k]
                elif k in defaults:
                    rec[k] = defaults[k]
                elif k in row:
                    rec[k] = None
            raise_first(path, n, check(rec))
            if rec[id_field] in seen:
                raise MBEIRFormatError(
                    path, n, id_field, f"duplicate id {rec[id_field]!r} (first at line {seen[rec[id_field]]})"
                )
            seen[rec[id_field]] = n
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count = n
    return count


def write_queries(path: str | Path, rows: Iterable[Mapping[str, Any]] | pa.Table) -> int:
    """Write query records (dicts or a read_queries table) as M-BEIR jsonl; validates; returns rows.

    A missing or null `neg_cand_list` is written as [] and a missing `query_src_content` as null,
    the shapes M-BEIR ships; the `line` column of a read table is dropped.
    """
    defaults = {"query_src_content": None, "neg_cand_list": []}
    return _write_jsonl(path, rows, QUERY_FIELDS, defaults, check_query_record, "qid")


def write_pool(path: str | Path, rows: Iterable[Mapping[str, Any]] | pa.Table) -> int:
    """Write candidate records as M-BEIR pool jsonl; validates; returns rows."""
    return _write_jsonl(path, rows, POOL_FIELDS, {"src_content": None}, check_pool_record, "did")


def write_qrels(
    path: str | Path,
    qrels: Mapping[str, Iterable[str]] | Iterable[tuple[str, str, int]],
    task_id: int | None = None,
) -> int:
    """Write `qid 0 did 1 task_id` lines, sorted; either {qid: dids} + task_id or (qid, did, task_id) triples."""
    if isinstance(qrels, Mapping):
        if task_id is None:
            raise ValueError("write_qrels: task_id is required with a {qid: dids} mapping")
        triples = [(q, d, int(task_id)) for q, ds in qrels.items() for d in ds]
    else:
        triples = [(q, d, int(t)) for q, d, t in qrels]
    triples.sort(key=lambda x: (split_id(x[0]), split_id(x[1])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, (q, d, t) in enumerate(triples, start=1):
            line = f"{q} 0 {d} 1 {t}"
            parsed = parse_qrels_line(line)
            if len(parsed) == 2:
                raise MBEIRFormatError(path, n, parsed[0], parsed[1])  # type: ignore[misc]
            f.write(line + "\n")
    return len(triples)


def qrels_from_queries(rows: Iterable[Mapping[str, Any]] | pa.Table) -> list[tuple[str, str, int]]:
    """(qid, did, task_id) for every positive of every query: the qrels M-BEIR ships beside a query file."""
    return [(r["qid"], d, int(r["task_id"])) for r in _rows(rows) for d in r["pos_cand_list"]]
