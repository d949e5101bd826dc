"""Validate an M-BEIR directory before spending GPU hours on it.

Every problem is reported as `FILE:LINE: field 'NAME': message` (the format of
`mbeir.MBEIRFormatError`), all problems are collected rather than stopping at the first, and the
per-record rules are the same functions the readers use (`mbeir.check_*`), and lines are split,
decoded and parsed by the one line reader every job uses (`data.jsonl`), so a directory that
validates also reads, with the same rows. Positives missing from a pool are counted per task but are not errors:
the published M-BEIR files contain such ids and evaluation simply cannot retrieve them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.data import catalogue, instructions, jsonl, mbeir

DEFAULT_KEEP = 1000


@dataclass(frozen=True)
class Problem:
    """One located problem; str() gives the FILE:LINE: field 'NAME': message line."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return mbeir.format_issue(self.file, self.line, self.field, self.message)


@dataclass
class FileReport:
    """Rows and problems of one file; `errors` counts all, `problems` keeps the first `keep`."""

    path: str
    kind: str  # "queries" | "pool" | "qrels" | "instructions" | "dir"
    rows: int = 0
    errors: int = 0
    problems: list[Problem] = field(default_factory=list)
    keep: int = DEFAULT_KEEP

    def add(self, line: int, field_name: str, message: str) -> None:
        self.errors += 1
        if len(self.problems) < self.keep:
            self.problems.append(Problem(self.path, line, field_name, message))


@dataclass
class PositiveCheck:
    """Positive ids of one query file that are absent from its pools (reported, not fatal)."""

    name: str
    query_file: str
    queries: int = 0
    positives: int = 0
    local_pool: str | None = None
    missing_local: int = 0
    queries_missing_local: int = 0
    union_pool: str | None = None
    missing_union: int = 0
    queries_missing_union: int = 0
    qrels_file: str | None = None
    qrels_mismatch: int = 0  # qids whose qrels positives differ from pos_cand_list

    def line(self) -> str:
        parts = [f"{self.name}: {self.queries} queries, {self.positives} positives"]
        if self.local_pool is not None:
            parts.append(
                f"{self.missing_local} absent from local pool ({self.queries_missing_local} queries)"
            )
        if self.union_pool is not None:
            parts.append(
                f"{self.missing_union} absent from union pool ({self.queries_missing_union} queries)"
            )
        if self.qrels_file is not None:
            parts.append(f"{self.qrels_mismatch} qids whose qrels differ from pos_cand_list")
        return ", ".join(parts)


@dataclass
class Report:
    """Everything validate_dir found; `ok` is False iff some file has errors."""

    root: str
    files: list[FileReport] = field(default_factory=list)
    positives: list[PositiveCheck] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(f.errors for f in self.files)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def problems(self) -> list[Problem]:
        return [p for f in self.files for p in f.problems]

    def format(self, max_errors: int = 50) -> str:
        """Human summary: per-file rows/errors, the first `max_errors` problems, per-task positives."""
        out = [f"M-BEIR directory {self.root}"]
        width = max([len(f.path) for f in self.files] + [4])
        out.append(f"{'file':<{width}}  {'kind':<12} {'rows':>9} {'errors':>7}")
        for f in self.files:
            out.append(f"{f.path:<{width}}  {f.kind:<12} {f.rows:>9} {f.errors:>7}")
        if self.positives:
            out.append("positives absent from pools (not fatal):")
            out.extend("  " + p.line() for p in self.positives)
        probs = self.problems()
        if probs:
            out.append(f"{self.errors} error(s):")
            out.extend(str(p) for p in probs[:max_errors])
            hidden = self.errors - min(len(probs), max_errors)
            if hidden > 0:
                out.append(f"... and {hidden} more error(s)")
        out.append("OK" if self.ok else f"FAILED: {self.errors} error(s)")
        return "\n".join(out)


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
        dr = FileReport(str(root), "dir", keep=keep)
        dr.add(0, "<dir>", "not a directory")
        report.files.append(dr)
        return report
    pools = _sorted_rel(root, ["cand_pool/**/*.jsonl"])
    queries = _sorted_rel(root, ["query/*/*.jsonl"])
    qrels_files = _sorted_rel(root, ["qrels/*/*.txt"])
    instr_files = _sorted_rel(root, ["instructions/*.tsv"])
    if not (pools or queries or qrels_files or instr_files):
        dr = FileReport(str(root), "dir", keep=keep)
        dr.add(
            0,
            "<dir>",
            "no M-BEIR files (query/*/*.jsonl, cand_pool/**/*.jsonl, qrels/*/*.txt, instructions/*.tsv)",
        )
        report.files.append(dr)
        return report

    instr_keys: set[tuple[int, str, str]] | None = None
    instr_path: str | None = None
    for rel in instr_files:
        rep, keys = validate_instructions_file(root / rel, keep=keep)
        report.files.append(rep)
        if rel == mbeir.INSTRUCTIONS_FILE or instr_keys is None:
            instr_keys, instr_path = keys, rel

    pool_ids: dict[str, set[str]] = {}
    for rel in pools:
        rep, ids = validate_pool_file(root / rel, root=root, check_images=check_images, keep=keep)
        report.files.append(rep)
        pool_ids[rel] = ids

    # Tasks from the file names (the 16 M-BEIR ones and any other mbeir_<dataset>_task<N> files).
    from umarvel_ray.data.tasks import discover_tasks

    found = [*catalogue.MBEIR_TASKS, *discover_tasks(root, "test"), *discover_tasks(root, "train")]
    task_by_query = {t.query_file: t for t in found}
    task_by_qrels = {t.qrels_file: t for t in found}
    query_reports: dict[str, FileReport] = {}
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
        query_reports[rel], scans[rel], checks[rel] = rep, scan, check
        report.positives.append(check)
        if instr_keys is not None:
            for key, line in sorted(scan.instruction_keys.items(), key=lambda kv: kv[1]):
                if key not in instr_keys:
                    ds, qm, cm = key
                    rep.add(
                        line,
                        "query_modality",
                        f"no instruction for dataset_id={ds}, {qm} -> {cm} in {instr_path}",
                    )

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
    return report
