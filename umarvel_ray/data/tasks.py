"""Tasks and pools of any directory laid out like M-BEIR, found from its file names.

M-BEIR names each task's files after its dataset and task id (UniIR's M-BEIR layout):
`query/<split>/mbeir_<dataset>_task<N>_<split>.jsonl`, its local pool
`cand_pool/local/mbeir_<dataset>_task<N>_cand_pool.jsonl` and its qrels
`qrels/<split>/mbeir_<dataset>_task<N>_<split>_qrels.txt`. Every query file of that shape is a
task here. The 16 M-BEIR tasks keep their `catalogue.MBEIR_TASKS` spec (label, R@5 / R@10 for the
Fashion tasks, column order); any other task gets a label from its file name ("myphotos t->i"),
R@5 unless the config says otherwise, and comes after the known ones, sorted by name.

The union files are optional: without `cand_pool/global/mbeir_union_<split>_cand_pool.jsonl` the
global pool is the union of the local pools (`merge_pools`: ids deduplicated, two different
records under one id refused with both FILE:LINEs); without `query/train/mbeir_union_up_train.jsonl`
training reads every per-task train file (`train_query_files`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from umarvel_ray.data import catalogue, jsonl, mbeir
from umarvel_ray.io import write_if_changed

log = logging.getLogger(__name__)

_SHORT = {"text": "t", "image": "i", "image,text": "(i,t)"}
UNION_NAME = "union"


def query_file_re(split: str) -> re.Pattern[str]:
    """File names of one split's per-task query files; the dataset part may hold '_' and '-'."""
    return re.compile(rf"mbeir_(?P<dataset>[A-Za-z0-9][A-Za-z0-9_.-]*?)_task(?P<task>[0-9])_{re.escape(split)}\.jsonl")


def task_paths(dataset: str, task_id: int, split: str = "test") -> tuple[str, str, str]:
    """(query, local pool, qrels) paths relative to the data root, by M-BEIR's naming."""
    stem = f"mbeir_{dataset}_task{task_id}"
    return (
        f"query/{split}/{stem}_{split}.jsonl",
        f"cand_pool/local/{stem}_cand_pool.jsonl" if split == "test" else f"cand_pool/local/{stem}_{split}_cand_pool.jsonl",
        f"qrels/{split}/{stem}_{split}_qrels.txt",
    )


def _first_dataset_id(path: Path) -> int:
    """Dataset id of a query file's first row (the `<dataset_id>` of its qid), for the report.

    -1 when the file is empty or its first row has no valid qid: that row is refused with its
    FILE:LINE by the validator, which every job runs on a query file before using it."""
    for _, obj, err in jsonl.iter_jsonl(path):
        qid = obj.get("qid") if err is None and isinstance(obj, dict) else None
        return mbeir.split_id(qid)[0] if mbeir.id_problem(qid, mbeir.QID_STRIDE) is None else -1
    return -1


def custom_task(dataset: str, task_id: int, dataset_id: int, k: int = 5, split: str = "test") -> catalogue.TaskSpec:
    """TaskSpec of a task that is not one of the 16: label "<dataset> <q>-><c>" from the file name."""
    qm, cm = catalogue.task_modalities(task_id)
    q, p, r = task_paths(dataset, task_id, split)
    return catalogue.TaskSpec(
        name=f"{dataset}_task{task_id}",
        dataset=dataset,
        dataset_id=dataset_id,
        task_id=task_id,
        k=int(k),
        label=f"{dataset} {_SHORT[qm]}->{_SHORT[cm]}",
        query_file=q,
        pool_file=p,
        qrels_file=r,
    )


def discover_tasks(
    root: str | Path, split: str = "test", k: Mapping[str, int] | None = None
) -> list[catalogue.TaskSpec]:
    """Every task whose query file exists under `root/query/<split>/`, known ones first.

    `k` overrides the metric of tasks that are not among the 16 ({name: k}); the 16 keep the
    published metric (R@10 for the Fashion tasks, R@5 for the rest), so asking to change one raises ValueError, as does an
    override for a task that is not in the directory.
    """
    root = Path(root)
    k = dict(k or {})
    pattern = query_file_re(split)
    known: dict[str, catalogue.TaskSpec] = {}
    custom: dict[str, catalogue.TaskSpec] = {}
    qdir = root / "query" / split
    for p in sorted(qdir.glob("mbeir_*.jsonl")) if qdir.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m is None or m.group("dataset") == UNION_NAME:
            continue
        dataset, task_id = m.group("dataset"), int(m.group("task"))
        name = f"{dataset}_task{task_id}"
        if split == "test" and name in catalogue.TASKS_BY_NAME:
            known[name] = catalogue.TASKS_BY_NAME[name]
        else:
            custom[name] = custom_task(dataset, task_id, _first_dataset_id(p), k.get(name, 5), split)
    fixed = sorted(set(k) & set(catalogue.TASKS_BY_NAME))
    if fixed:
        raise ValueError(f"task_k: the M-BEIR tasks keep the published metric (R@5, R@10 for Fashion): {fixed}")
    unknown = sorted(set(k) - set(custom))
    if unknown:
        raise ValueError(f"task_k names task(s) not in {qdir}: {unknown}; found: {sorted(custom)}")
    return [t for t in catalogue.MBEIR_TASKS if t.name in known] + [custom[n] for n in sorted(custom)]


def expected_tasks(found: Sequence[catalogue.TaskSpec]) -> list[catalogue.TaskSpec]:
    """The tasks a report is measured against: all 16 M-BEIR tasks when the directory holds any of
    them (so a partial M-BEIR run says what is missing), then the directory's other tasks."""
    names = {t.name for t in found}
    base = list(catalogue.MBEIR_TASKS) if (names & set(catalogue.TASKS_BY_NAME) or not found) else []
    return base + [t for t in found if t.name not in catalogue.TASKS_BY_NAME]


# ----------------------------------------------------------------------------------------------
# Pools: the union of several pool files
# ----------------------------------------------------------------------------------------------


def _record_key(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(obj.get(f) for f in mbeir.POOL_FIELDS)


def merge_pools(files: Sequence[Path], out: Path) -> int:
    """Write the union of pool files to `out` (first occurrence of each did, in file order).

    The same did in two files must be the same record (all of `mbeir.POOL_FIELDS` equal): a
    conflict raises MBEIRFormatError at the later FILE:LINE naming the first one. `out` is
    rewritten only when its content changes, so fingerprints of later stages stay valid.
    Returns the number of candidates.
    """
    seen: dict[str, tuple[tuple[Any, ...], str]] = {}
    lines: list[str] = []
    for f in files:
        for n, obj, err in jsonl.iter_jsonl(f):
            if err is not None:
                raise mbeir.MBEIRFormatError(f, n, "<json>", err)
            mbeir.raise_first(f, n, mbeir.check_pool_record(obj))
            key = _record_key(obj)
            did = obj["did"]
            if did in seen:
                if seen[did][0] != key:
                    raise mbeir.MBEIRFormatError(
                        f, n, "did", f"id {did!r} is also at {seen[did][1]} with a different record"
                    )
                continue
            seen[did] = (key, f"{f}:{n}")
            lines.append(json.dumps({k: obj.get(k) for k in mbeir.POOL_FIELDS}, ensure_ascii=False) + "\n")
    write_if_changed(out, "".join(lines).encode("utf-8"))
    return len(lines)


def union_test_pool(root: Path, tasks: Iterable[catalogue.TaskSpec], out: Path) -> tuple[Path, list[Path]]:
    """The global pool built from the local pools of `tasks` that exist: (file, its sources)."""
    files = [root / t.pool_file for t in tasks if (root / t.pool_file).is_file()]
    if not files:
        raise FileNotFoundError(f"no local pool files under {root / 'cand_pool/local'} to build a global pool from")
    n = merge_pools(files, out)
    log.info("global pool = union of %d local pools: %d candidates -> %s", len(files), n, out)
    return out, files


# ----------------------------------------------------------------------------------------------
# Training inputs
# ----------------------------------------------------------------------------------------------


def train_query_files(root: str | Path) -> list[Path]:
    """Every per-task train query file (`query/train/mbeir_<dataset>_task<N>_train.jsonl`), sorted."""
    qdir = Path(root) / "query" / "train"
    pattern = query_file_re("train")
    if not qdir.is_dir():
        return []
    return [
        p
        for p in sorted(qdir.glob("mbeir_*.jsonl"))
        if (m := pattern.fullmatch(p.name)) is not None and m.group("dataset") != UNION_NAME
    ]


def local_pool_files(root: str | Path) -> list[Path]:
    """Every pool under cand_pool/local (test pools and `*_train_cand_pool.jsonl`), sorted."""
    d = Path(root) / "cand_pool" / "local"
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def upsample_factors(counts: Mapping[str, int], min_queries: int) -> dict[str, int]:
    """How many times each train file is repeated so that it has at least `min_queries` rows.

    M-BEIR's `mbeir_union_up_train.jsonl` repeats the small datasets' training queries (1.33M
    queries, the small datasets up-sampled; UniIR, Wei et al. 2023,
    arXiv:2311.17136). The published union file does not state the factors, so this rule is the
    project's: factor = ceil(min_queries / rows), at least 1; `min_queries=0` switches it off.
    """
    if min_queries <= 0:
        return {k: 1 for k in counts}
    return {k: max(1, -(-int(min_queries) // max(1, int(n)))) for k, n in counts.items()}


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def resolve_train_inputs(
    root: str | Path, train_file: str | Path, pool_file: str | Path, cache_dir: str | Path
) -> tuple[list[Path], Path, str]:
    """(query files, pool file, how) for stages 3-5, mining, teacher and reranker training.

    `train_file` / `pool_file` are used when they exist. Only M-BEIR's union files may be missing
    (any other path that is not there raises FileNotFoundError "input file not found"): without
    the union train file every per-task train file is used; without the union pool, the union of
    the local pools is written to `cache_dir/train_cand_pool.jsonl`. Either replacement is logged, and `how` says
    which was taken ("union" or "per-task"). Nothing to train on raises FileNotFoundError naming
    both the missing file and the per-task pattern.
    """
    root, train_file, pool_file = Path(root), Path(train_file), Path(pool_file)
    for given, union in ((train_file, mbeir.TRAIN_QUERY_FILE), (pool_file, mbeir.TRAIN_POOL_FILE)):
        if not given.is_file() and not _same(given, root / union):
            raise FileNotFoundError(f"input file not found: {given}")  # only the union file is optional
    how = "union"
    if train_file.is_file():
        queries = [train_file]
    else:
        queries = train_query_files(root)
        if not queries:
            raise FileNotFoundError(
                f"no training queries: {train_file} is missing and {root}/query/train/ has no "
                "mbeir_<dataset>_task<N>_train.jsonl files (jobs/import_data.py writes them)"
            )
        how = "per-task"
        log.info("%s missing: training on %d per-task train files", train_file, len(queries))
    if pool_file.is_file():
        pool = pool_file
    else:
        files = local_pool_files(root)
        if not files:
            raise FileNotFoundError(f"no candidate pool: {pool_file} is missing and {root}/cand_pool/local/ is empty")
        pool = Path(cache_dir) / "train_cand_pool.jsonl"
        n = merge_pools(files, pool)
        how = "per-task"
        log.info("%s missing: train pool = union of %d local pools (%d candidates) -> %s", pool_file, len(files), n, pool)
    return queries, pool, how


def concat_queries(files: Sequence[Path], out: Path) -> Path:
    """One query file from several (for jobs that read a single file: mining, teacher, reranker).

    A qid in two files is refused with its FILE:LINE (an id must name one query)."""
    if len(files) == 1:
        return files[0]
    seen: dict[str, str] = {}
    parts: list[bytes] = []
    for f in files:
        for n, obj, err in jsonl.iter_jsonl(f):
            if err is not None:
                raise mbeir.MBEIRFormatError(f, n, "<json>", err)
            qid = obj.get("qid") if isinstance(obj, dict) else None
            if qid in seen:
                raise mbeir.MBEIRFormatError(f, n, "qid", f"id {qid!r} is also at {seen[qid]}")
            seen[str(qid)] = f"{f}:{n}"
        b = f.read_bytes()
        parts.append(b if not b or b.endswith(b"\n") else b + b"\n")
    write_if_changed(out, b"".join(parts))
    return out


__all__ = [
    "concat_queries",
    "custom_task",
    "discover_tasks",
    "expected_tasks",
    "local_pool_files",
    "merge_pools",
    "resolve_train_inputs",
    "single_train_inputs",
    "task_paths",
    "train_query_files",
    "union_test_pool",
    "upsample_factors",
]


def single_train_inputs(
    root: str | Path, train_file: str | Path, pool_file: str | Path, cache_dir: str | Path
) -> tuple[Path, Path]:
    """`resolve_train_inputs` for jobs that read one query file (mining, teacher scoring): several
    per-task files are concatenated into `cache_dir/train_queries.jsonl` (qids must not repeat)."""
    queries, pool, _ = resolve_train_inputs(root, train_file, pool_file, cache_dir)
    return concat_queries(queries, Path(cache_dir) / "train_queries.jsonl"), pool


def job_train_inputs(
    data_root: str, query_file: str, pool_file: str, output_dir: str
) -> tuple[Path, Path, Path, Path]:
    """(data_root, query file, pool file, output dir) of a mining or teacher-scoring job, with the
    per-task fallback of `single_train_inputs` written under `<output_dir>/inputs`.

    Raises ConfigError (the job's bad-config exit) when the inputs cannot be found.
    """
    from umarvel_ray.config import ConfigError

    root, out = Path(data_root).expanduser(), Path(output_dir).expanduser()
    try:  # no union train files: the per-task train files and the union of the local pools
        qf, pf = single_train_inputs(root, root / query_file, root / pool_file, out / "inputs")
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    return root, qf, pf, out
