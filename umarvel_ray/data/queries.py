"""Training queries as mining and teacher scoring see them: id, task, positives and where the
record's line lies in its file (so a subset can be re-read without parsing the whole file again)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from umarvel_ray.data import catalogue, mbeir


def qid_sort_key(qid: str) -> tuple[int, int, str]:
    """Numeric (dataset_id, n) order for canonical ids, anything else after them by string."""
    try:
        ds, n = mbeir.split_id(qid)
        return ds, n, ""
    except ValueError:
        return 1 << 62, 0, qid


def task_name(dataset_id: int, task_id: int) -> str:
    """M-BEIR task name as in MBEIR_TASKS ("mscoco_task0"); unknown datasets as "ds<id>_task<t>"."""
    ds = catalogue.DATASET_NAMES.get(int(dataset_id))
    return f"{ds.lower() if ds else f'ds{dataset_id}'}_task{int(task_id)}"


@dataclass
class QueryMeta:
    """What mining and teacher scoring need to know about one training query."""

    qid: str
    task_id: int
    dataset_id: int
    positives: frozenset[str]
    offset: int = -1  # byte offset of the record's line in its file
    length: int = 0  # byte length of that line (newline included)

    @property
    def task(self) -> str:
        return task_name(self.dataset_id, self.task_id)

    @property
    def target_modality(self) -> str:
        return catalogue.task_modalities(self.task_id)[1]


def read_query_meta(
    path: Path, max_queries: int | None = None, keep_lines: bool = False
) -> tuple[dict[str, QueryMeta], list[bytes], int, int]:
    """Valid query records of `path` (first `max_queries` non-blank lines when set).

    Lines are split by the one line reader (`data.jsonl`); a meta's (offset, length) is its line's
    content (no BOM, no line end). Returns (qid -> meta, the non-blank lines, each re-ended with LF,
    when `keep_lines`, lines read, invalid count).
    Invalid records are counted, not raised: the embedding pipeline rejects them the same way.
    Duplicate qids keep their first record (the embedding pipeline does the same).
    """
    from umarvel_ray.data.jsonl import iter_file_lines, parse_json

    metas: dict[str, QueryMeta] = {}
    lines: list[bytes] = []
    n_read = invalid = 0
    for ln in iter_file_lines(path):
        if ln.blank:
            continue
        if max_queries is not None and n_read >= max_queries:
            break
        n_read += 1
        if keep_lines:
            lines.append(ln.content + b"\n")
        obj, err = parse_json(ln.content)
        if err is not None or mbeir.check_query_record(obj) or obj["qid"] in metas:
            invalid += 1
            continue
        ds, _ = mbeir.split_id(obj["qid"])
        metas[obj["qid"]] = QueryMeta(
            obj["qid"], int(obj["task_id"]), ds, frozenset(obj["pos_cand_list"]), ln.start, len(ln.content)
        )
    return metas, lines, n_read, invalid


__all__ = ["QueryMeta", "qid_sort_key", "read_query_meta", "task_name"]
