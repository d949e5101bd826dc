"""Evaluation outputs: TREC run files, one JSON with every number, and the 16-task markdown table.

Results are passed around as `{task_name: {"local": RetrievalMetrics, "global": RetrievalMetrics}}`
(either pool may be absent). The table follows MBEIR_TASKS (docs/RECIPE.md section 2 column order) and
reports the hit rate at each task's k (R@5, or R@10 for Fashion200K / FashionIQ) in percent.
Tasks of a directory's own (`data.tasks.discover_tasks`) come after the 16, at their own k.
Averages are the unweighted mean over tasks; with fewer than 16 tasks present the label says how
many and which are missing, so a partial run is never mistaken for the headline number; over any
other task set the label names the tasks the mean is taken over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from umarvel_ray.data.catalogue import MBEIR_TASKS, TaskSpec
from umarvel_ray.eval.metrics import RetrievalMetrics, Run, macro_average
from umarvel_ray.index.base import PAD_ID
from umarvel_ray.io import atomic_write_lines, atomic_write_text

POOLS = ("local", "global")
Results = Mapping[str, Mapping[str, RetrievalMetrics]]


# -- TREC run files ------------------------------------------------------------------------------


def trec_lines(run: Mapping[str, Sequence[tuple[str, float]]], run_id: str) -> Iterator[str]:
    """`qid Q0 did rank score run_id` lines, rank from 1, in the run's order (padding skipped)."""
    if not run_id or any(c.isspace() for c in run_id):
        raise ValueError(f"run_id must be a non-empty token without spaces, got {run_id!r}")
    for qid, ranking in run.items():
        rank = 0
        for did, score in ranking:
            if did == PAD_ID:
                continue
            if any(c.isspace() for c in f"{qid}{did}"):
                raise ValueError(f"ids with whitespace cannot be written to a TREC run: {qid!r} {did!r}")
            rank += 1
            yield f"{qid} Q0 {did} {rank} {float(score):.6f} {run_id}"


def write_trec_run(
    path: str | os.PathLike[str], run: Mapping[str, Sequence[tuple[str, float]]], run_id: str
) -> int:
    """Write a run file atomically; returns the number of lines."""
    lines = [line + "\n" for line in trec_lines(run, run_id)]
    atomic_write_lines(path, lines)
    return len(lines)


def read_trec_run(path: str | os.PathLike[str]) -> Run:
    """Read a run file back into `{qid: [(did, score), ...]}` in rank order."""
    rows: dict[str, list[tuple[int, str, float]]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 fields 'qid Q0 did rank score run_id'")
            qid, _, did, rank, score, _ = parts
            rows.setdefault(qid, []).append((int(rank), did, float(score)))
    return {q: [(d, s) for _, d, s in sorted(r, key=lambda t: t[0])] for q, r in rows.items()}


def run_path(out_dir: str | os.PathLike[str], task: str, pool: str) -> Path:
    """Where the run file of one task and pool lives under an evaluation directory."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return Path(out_dir) / "runs" / f"{task}.{pool}.trec"


# -- numbers --------------------------------------------------------------------------------------


def _task_order(results: Results, tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    known = {t.name for t in tasks}
    unknown = sorted(set(results) - known)
    if unknown:
        raise ValueError(f"results for unknown tasks {unknown}; known: {sorted(known)}")
    return list(tasks)


def pool_average(results: Results, pool: str, tasks: Sequence[TaskSpec] = MBEIR_TASKS) -> dict[str, Any]:
    """Mean hit@k of one pool over the tasks that have it, with the count and the missing tasks."""
    present = [t for t in tasks if pool in results.get(t.name, {})]
    value = macro_average(results[t.name][pool].hit for t in present)
    missing = [t.name for t in tasks if t not in present]
    return {
        "value": value,
        "n_tasks": len(present),
        "n_expected": len(tasks),
        "missing": missing,
        "tasks": [t.name for t in present],
        "mbeir16": [t.name for t in tasks] == [t.name for t in MBEIR_TASKS],
    }


def average_label(avg: Mapping[str, Any]) -> str:
    """'avg of 16', or 'avg of 3/16 tasks present' when the run is partial; over any other task
    set (a directory with tasks of its own) the label names the tasks the mean is taken over."""
    if avg.get("mbeir16", True):
        if avg["n_tasks"] == avg["n_expected"]:
            return f"avg of {avg['n_expected']}"
        return f"avg of {avg['n_tasks']}/{avg['n_expected']} tasks present"
    over = ", ".join(avg.get("tasks", []))
    if avg["n_tasks"] == avg["n_expected"]:
        return f"avg of {avg['n_tasks']}: {over}"
    return f"avg of {avg['n_tasks']}/{avg['n_expected']} tasks present: {over}"


def report_dict(
    results: Results,
    tasks: Sequence[TaskSpec] = MBEIR_TASKS,
    settings: Mapping[str, Any] | None = None,
    task_settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the evaluation measured, JSON-ready (fractions in [0, 1], not percent)."""
    ordered = _task_order(results, tasks)
    out_tasks: dict[str, Any] = {}
    for t in ordered:
        if t.name not in results:
            continue
        entry: dict[str, Any] = {"label": t.label, "k": t.k, "metric": f"R@{t.k}"}
        for pool in POOLS:
            m = results[t.name].get(pool)
            if m is not None:
                if m.k != t.k:
                    raise ValueError(f"{t.name} {pool}: evaluated at k={m.k}, task metric is R@{t.k}")
                entry[pool] = m.to_dict()
        entry["settings"] = dict((task_settings or {}).get(t.name, {}))
        out_tasks[t.name] = entry
    averages = {}
    for pool in POOLS:
        avg = pool_average(results, pool, ordered)
        avg["label"] = average_label(avg)
        averages[pool] = avg
    return {
        "order": [t.name for t in ordered],
        "tasks": out_tasks,
        "averages": averages,
        "settings": dict(settings or {}),
    }


# -- markdown -------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _hit(results: Results, task: str, pool: str) -> float | None:
    m = results.get(task, {}).get(pool)
    return None if m is None else m.hit


def markdown_table(
    results: Results, tasks: Sequence[TaskSpec] = MBEIR_TASKS, title: str | None = None
) -> str:
    """Two views of the same numbers: one row per task, and the papers' one-line-per-pool layout."""
    ordered = _task_order(results, tasks)
    avgs = {pool: pool_average(results, pool, ordered) for pool in POOLS}
    lines = [f"## {title}", ""] if title else []
    lines += ["| Task | Metric | Local | Global |", "|---|---|---|---|"]
    for t in ordered:
        lines.append(
            f"| {t.label} | R@{t.k} | {_pct(_hit(results, t.name, 'local'))} | "
            f"{_pct(_hit(results, t.name, 'global'))} |"
        )
    labels = {pool: average_label(avgs[pool]) for pool in POOLS}
    avg_name = (
        f"**Average ({labels['local']})**"
        if labels["local"] == labels["global"]
        else f"**Average (local {labels['local']}; global {labels['global']})**"
    )
    lines.append(f"| {avg_name} | | {_pct(avgs['local']['value'])} | {_pct(avgs['global']['value'])} |")
    lines += ["", "| Pool | " + " | ".join(f"{t.label} R@{t.k}" for t in ordered) + " | Avg |"]
    lines.append("|---" * (len(ordered) + 2) + "|")
    for pool in POOLS:
        cells = [_pct(_hit(results, t.name, pool)) for t in ordered]
        lines.append(f"| {pool} | " + " | ".join(cells) + f" | {_pct(avgs[pool]['value'])} |")
    notes = [
        f"{pool}: {average_label(avgs[pool])} (missing: {', '.join(avgs[pool]['missing'])})"
        for pool in POOLS
        if avgs[pool]["missing"] and avgs[pool]["n_tasks"]
    ]
    if notes:
        lines += ["", "Partial run: averages are over the tasks present only. " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | os.PathLike[str],
    results: Results,
    settings: Mapping[str, Any] | None = None,
    task_settings: Mapping[str, Mapping[str, Any]] | None = None,
    tasks: Sequence[TaskSpec] = MBEIR_TASKS,
    name: str = "mbeir",
    title: str | None = None,
) -> dict[str, Path]:
    """Write `<name>.json` and `<name>.md` under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_dict(results, tasks, settings, task_settings)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    for key, text in (
        ("json", json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"),
        ("markdown", markdown_table(results, tasks, title)),
    ):
        atomic_write_text(paths[key], text)
    return paths


def results_from_report(data: Mapping[str, Any]) -> dict[str, dict[str, RetrievalMetrics]]:
    """Inverse of report_dict's per-task numbers (to re-render or compare saved reports)."""
    return {
        name: {pool: RetrievalMetrics.from_dict(entry[pool]) for pool in POOLS if pool in entry}
        for name, entry in data["tasks"].items()
    }


def missing_tasks(
    results: Results, pools: Iterable[str] = POOLS, tasks: Sequence[TaskSpec] = MBEIR_TASKS
) -> list[str]:
    """'task/pool' pairs not evaluated (for the job's final SUMMARY line)."""
    return [f"{t.name}/{p}" for t in tasks for p in pools if p not in results.get(t.name, {})]
