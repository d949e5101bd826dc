"""Validate an M-BEIR directory before spending GPU hours on it.

Every problem is reported as `FILE:LINE: field 'NAME': message` (the format of
`mbeir.MBEIRFormatError`), all problems are collected rather than stopping at the first, and the
per-record rules are the same functions the readers use (`mbeir.check_*`), and lines are split,
decoded and parsed by the one line reader every job uses (`data.jsonl`), so a directory that
validates also reads, with the same rows. Positives missing from a pool are counted per task but are not errors:
the published M-BEIR files contain such ids and evaluation simply cannot retrieve them.
What a validation returns (`Report`, `FileReport`, `Problem`) is `data.validation_report`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.data import catalogue, instructions, jsonl, mbeir
from umarvel_ray.data.validation_report import DEFAULT_KEEP, FileReport, PositiveCheck, Report

# ----------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------


def _image_missing(root: Path | None, rel: Any) -> bool:
    return root is not None and isinstance(rel, str) and rel.strip() != "" and not (root / rel).is_file()


def validate_pool_file(
    path: str | Path,
    root: str | Path | None = None,
    check_images: bool = False,
    keep: int = DEFAULT_KEEP,
) -> tuple[FileReport, set[str]]:
    """Check every line of a candidate pool; also return its set of dids (for positive checks)."""
    rep = FileReport(str(path), "pool", keep=keep)
    seen: dict[str, int] = {}
    img_root = Path(root) if check_images and root is not None else None
    try:
        for n, obj, err in mbeir.iter_jsonl(path):
            rep.rows += 1
            if err is not None:
                rep.add(n, "<json>", err)
                continue
            for f, msg in mbeir.check_pool_record(obj):
                rep.add(n, f, msg)
            if not isinstance(obj, dict):
                continue
            did = obj.get("did")
            if isinstance(did, str):
                if did in seen:
                    rep.add(n, "did", f"duplicate id {did!r} (first at line {seen[did]})")
                else:
                    seen[did] = n
            if img_root is not None and _image_missing(img_root, obj.get("img_path")):
                rep.add(n, "img_path", f"image not found: {img_root / obj['img_path']}")
    except (OSError, UnicodeDecodeError) as e:
        rep.add(0, "<file>", f"cannot read: {e}")
    return rep, set(seen)


@dataclass
class _QueryScan:
    """What query validation remembers for cross-file checks."""

    positives: dict[str, frozenset[str]] = field(default_factory=dict)
    instruction_keys: dict[tuple[int, str, str], int] = field(default_factory=dict)


def validate_query_file(
    path: str | Path,
    root: str | Path | None = None,
    check_images: bool = False,
    keep: int = DEFAULT_KEEP,
    local_pool: set[str] | None = None,
    union_pool: set[str] | None = None,
    check: PositiveCheck | None = None,
    scan: _QueryScan | None = None,
) -> FileReport:
    """Check every line of a query file; count positives absent from the given pools into `check`."""
    rep = FileReport(str(path), "queries", keep=keep)
    seen: dict[str, int] = {}
    img_root = Path(root) if check_images and root is not None else None
    try:
        for n, obj, err in mbeir.iter_jsonl(path):
            rep.rows += 1
            if err is not None:
                rep.add(n, "<json>", err)
                continue
            issues = mbeir.check_query_record(obj)
            for f, msg in issues:
                rep.add(n, f, msg)
            if not isinstance(obj, dict):
                continue
            qid = obj.get("qid")
            if isinstance(qid, str):
                if qid in seen:
                    rep.add(n, "qid", f"duplicate id {qid!r} (first at line {seen[qid]})")
                else:
                    seen[qid] = n
            if img_root is not None and _image_missing(img_root, obj.get("query_img_path")):
                rep.add(n, "query_img_path", f"image not found: {img_root / obj['query_img_path']}")
            bad = {f for f, _ in issues}
            pos = obj.get("pos_cand_list")
            if "pos_cand_list" in bad or not isinstance(pos, list):
                continue
            if check is not None:
                _count_positives(check, pos, local_pool, union_pool)
            if scan is not None and isinstance(qid, str):
                scan.positives[qid] = frozenset(pos)
            if scan is not None and not bad & {"qid", "task_id", "query_modality"}:
                ds = mbeir.split_id(qid)[0]
                key = (ds, obj["query_modality"], catalogue.task_modalities(obj["task_id"])[1])
                scan.instruction_keys.setdefault(key, n)
    except (OSError, UnicodeDecodeError) as e:
        rep.add(0, "<file>", f"cannot read: {e}")
    return rep


def _count_positives(
    check: PositiveCheck, pos: list[Any], local: set[str] | None, union: set[str] | None
) -> None:
    check.queries += 1
    check.positives += len(pos)
    if local is not None:
        miss = sum(1 for d in pos if d not in local)
        check.missing_local += miss
        check.queries_missing_local += miss > 0
    if union is not None:
        miss = sum(1 for d in pos if d not in union)
        check.missing_union += miss
        check.queries_missing_union += miss > 0


def validate_qrels_file(
    path: str | Path, expected_task_id: int | None = None, keep: int = DEFAULT_KEEP
) -> tuple[FileReport, dict[str, set[str]]]:
    """Check `qid 0 did 1 task_id` lines (task_id must match the file's task when known)."""
    rep = FileReport(str(path), "qrels", keep=keep)
    qrels: dict[str, set[str]] = {}
    try:
        for n, raw, err in jsonl.iter_text(path):
            rep.rows += 1
            if err is not None:
                rep.add(n, "<line>", err)
                continue
            parsed = mbeir.parse_qrels_line(raw)  # type: ignore[arg-type]
            if len(parsed) == 2:
                rep.add(n, parsed[0], parsed[1])  # type: ignore[misc]
                continue
            qid, did, rel, task = parsed  # type: ignore[misc]
            if expected_task_id is not None and task != expected_task_id:
                rep.add(n, "task_id", f"task_id {task} but this file belongs to task {expected_task_id}")
            if rel > 0:
                qrels.setdefault(qid, set()).add(did)
    except (OSError, UnicodeDecodeError) as e:
        rep.add(0, "<file>", f"cannot read: {e}")
    return rep, qrels


def validate_instructions_file(
    path: str | Path, keep: int = DEFAULT_KEEP
) -> tuple[FileReport, set[tuple[int, str, str]]]:
    """Check the instruction tsv: header, modalities, integer dataset_id, prompts, duplicate keys."""
    rep = FileReport(str(path), "instructions", keep=keep)
    keys: dict[tuple[int, str, str], int] = {}
    try:
        with open(path, encoding=instructions.TSV_ENCODING, newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            names = [h.strip() for h in header] if header else []
            if names[:2] != ["query_modality", "cand_modality"] or len(names) < 5:
                rep.add(
                    1,
                    "<header>",
                    f"expected 'query_modality\\tcand_modality\\t<name>\\tdataset_id\\tprompt_1..', got {names[:5]}",
                )
                return rep, set()
            for cells in reader:
                n = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                rep.rows += 1
                parsed = instructions.parse_instruction_row(cells)
                if isinstance(parsed, tuple):
                    rep.add(n, parsed[0], parsed[1])
                    continue
                key = (parsed.dataset_id, parsed.query_modality, parsed.cand_modality)
                if key in keys:
                    rep.add(n, "dataset_id", f"duplicate row for {key} (first at line {keys[key]})")
                else:
                    keys[key] = n
    except (OSError, UnicodeDecodeError) as e:
        rep.add(0, "<file>", f"cannot read: {e}")
    return rep, set(keys)


# ----------------------------------------------------------------------------------------------
# Whole directory
# ----------------------------------------------------------------------------------------------


def _split_of(rel: str) -> str | None:
    parts = rel.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "query" else None


def _qrels_for(rel_query: str) -> str:
    """query/<split>/<stem>.jsonl -> qrels/<split>/<stem>_qrels.txt (M-BEIR naming)."""
    split = _split_of(rel_query)
    stem = Path(rel_query).stem
    return f"qrels/{split}/{stem}_qrels.txt"


def _sorted_rel(root: Path, patterns: Iterable[str]) -> list[str]:
    found = {p.relative_to(root).as_posix() for pat in patterns for p in root.glob(pat) if p.is_file()}
    return sorted(found)


def validate_dir(root: str | Path, check_images: bool = False, keep: int = DEFAULT_KEEP) -> Report:
    """Validate whatever standard M-BEIR files exist under `root` and cross-check them."""
    root = Path(root)
    report = Report(str(root))
    if not root.is_dir():
        return _dir_problem(report, root, "not a directory", keep)
    pools = _sorted_rel(root, ["cand_pool/**/*.jsonl"])
    queries = _sorted_rel(root, ["query/*/*.jsonl"])
    qrels_files = _sorted_rel(root, ["qrels/*/*.txt"])
    instr_files = _sorted_rel(root, ["instructions/*.tsv"])
    if not (pools or queries or qrels_files or instr_files):
        return _dir_problem(
            report,
            root,
            "no M-BEIR files (query/*/*.jsonl, cand_pool/**/*.jsonl, qrels/*/*.txt, instructions/*.tsv)",
            keep,
        )
    instr = _check_instruction_files(root, instr_files, report, keep)
    pool_ids = _check_pool_files(root, pools, report, check_images, keep)
    tasks = _known_tasks(root)
    scans, checks = _check_query_files(
        root, queries, qrels_files, pool_ids, instr, tasks, report, check_images, keep
    )
    _check_qrels_files(root, qrels_files, tasks, scans, checks, report, keep)
    return report


def _dir_problem(report: Report, root: Path, message: str, keep: int) -> Report:
    """The report of a directory that cannot be validated at all: one `<dir>` problem, no files."""
    dr = FileReport(str(root), "dir", keep=keep)
    dr.add(0, "<dir>", message)
    report.files.append(dr)
    return report


_InstructionKeys = tuple[set[tuple[int, str, str]] | None, str | None]


def _check_instruction_files(root: Path, instr_files: list[str], report: Report, keep: int) -> _InstructionKeys:
    """Validate every instruction tsv; queries are checked against the standard one (else the
    first found): (its (dataset_id, query modality, cand modality) keys, its path), or Nones."""
    instr_keys: set[tuple[int, str, str]] | None = None
    instr_path: str | None = None
    for rel in instr_files:
        rep, keys = validate_instructions_file(root / rel, keep=keep)
        report.files.append(rep)
        if rel == mbeir.INSTRUCTIONS_FILE or instr_keys is None:
            instr_keys, instr_path = keys, rel
    return instr_keys, instr_path


def _check_pool_files(
    root: Path, pools: list[str], report: Report, check_images: bool, keep: int
) -> dict[str, set[str]]:
    """Validate every pool; their dids by path, for the positive checks of the query files."""
    pool_ids: dict[str, set[str]] = {}
    for rel in pools:
        rep, ids = validate_pool_file(root / rel, root=root, check_images=check_images, keep=keep)
        report.files.append(rep)
        pool_ids[rel] = ids
    return pool_ids


def _known_tasks(root: Path) -> list[catalogue.TaskSpec]:
    """Tasks from the file names: the 16 M-BEIR ones and any other mbeir_<dataset>_task<N> files
    (their local pool and the task id their qrels must carry)."""
    from umarvel_ray.data.tasks import discover_tasks

    return [*catalogue.MBEIR_TASKS, *discover_tasks(root, "test"), *discover_tasks(root, "train")]


def _check_query_files(
    root: Path,
    queries: list[str],
    qrels_files: list[str],
    pool_ids: dict[str, set[str]],
    instr: _InstructionKeys,
    tasks: list[catalogue.TaskSpec],
    report: Report,
    check_images: bool,
    keep: int,
) -> tuple[dict[str, _QueryScan], dict[str, PositiveCheck]]:
    """Validate every query file, count its positives absent from its local and union pools, and
    flag queries with no instruction; the scans and checks by path, for the qrels cross-check."""
    task_by_query = {t.query_file: t for t in tasks}
    scans: dict[str, _QueryScan] = {}
    checks: dict[str, PositiveCheck] = {}
    for rel in queries:
        task = task_by_query.get(rel)
        split = _split_of(rel)
        local_rel = task.pool_file if task else None
        union_rel = f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl"
        qrels_rel = _qrels_for(rel)
        check = PositiveCheck(
            name=task.name if task else Path(rel).stem,
            query_file=rel,
            local_pool=local_rel if local_rel in pool_ids else None,
            union_pool=union_rel if union_rel in pool_ids else None,
            qrels_file=qrels_rel if qrels_rel in qrels_files else None,
        )
        scan = _QueryScan()
        rep = validate_query_file(
            root / rel,
            root=root,
            check_images=check_images,
            keep=keep,
            local_pool=pool_ids.get(check.local_pool) if check.local_pool else None,
            union_pool=pool_ids.get(check.union_pool) if check.union_pool else None,
            check=check,
            scan=scan,
        )
        if not check.qrels_file:
            scan.positives.clear()
        report.files.append(rep)
        scans[rel], checks[rel] = scan, check
        report.positives.append(check)
        _flag_missing_instructions(rep, scan, instr)
    return scans, checks


def _flag_missing_instructions(rep: FileReport, scan: _QueryScan, instr: _InstructionKeys) -> None:
    """One error per instruction key a query file needs and the tsv lacks, at its first query."""
    instr_keys, instr_path = instr
    if instr_keys is None:
        return
    for key, line in sorted(scan.instruction_keys.items(), key=lambda kv: kv[1]):
        if key not in instr_keys:
            ds, qm, cm = key
            rep.add(
                line,
                "query_modality",
                f"no instruction for dataset_id={ds}, {qm} -> {cm} in {instr_path}",
            )


def _check_qrels_files(
    root: Path,
    qrels_files: list[str],
    tasks: list[catalogue.TaskSpec],
    scans: dict[str, _QueryScan],
    checks: dict[str, PositiveCheck],
    report: Report,
    keep: int,
) -> None:
    """Validate every qrels file (task id from its name when known) and count, per query file,
    the qids whose qrels positives differ from its pos_cand_list."""
    task_by_qrels = {t.qrels_file: t for t in tasks}
    by_qrels = {c.qrels_file: rel for rel, c in checks.items() if c.qrels_file}
    for rel in qrels_files:
        task = task_by_qrels.get(rel)
        rep, qrels = validate_qrels_file(
            root / rel, expected_task_id=task.task_id if task else None, keep=keep
        )
        report.files.append(rep)
        qrel_query = by_qrels.get(rel)
        if qrel_query is not None:
            positives = scans[qrel_query].positives
            qids = set(positives) | set(qrels)
            checks[qrel_query].qrels_mismatch = sum(
                1 for q in qids if positives.get(q, frozenset()) != frozenset(qrels.get(q, ()))
            )
