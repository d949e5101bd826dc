"""What `validate.py` reports: located problems, per-file counts, per-task positives, the summary.

A `Problem` prints as `FILE:LINE: field 'NAME': message` (`mbeir.format_issue`, the format of
`mbeir.MBEIRFormatError`); a `FileReport` counts every problem of one file but keeps only the
first `keep`, so a broken million-line file still gives a short report; a `PositiveCheck` counts
positives absent from a query file's pools (reported, not errors); `Report.format` is the text the
validate job prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from umarvel_ray.data import mbeir

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
