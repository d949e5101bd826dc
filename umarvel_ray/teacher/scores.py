"""The teacher score rule: cos + w * P(Yes), w per task (`model.fusion`); and the teacher.jsonl records
built with it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from umarvel_ray.index.local_pool import RetrievedQuery
from umarvel_ray.model.fusion import fused_scores, task_weight
from umarvel_ray.teacher.config import TeacherConfig


def teacher_scores(cos: Sequence[float], p_yes: Sequence[float] | None, weight: float) -> list[float]:
    """cos + weight * p_yes element-wise (`model.fusion.fused_scores`); cos alone without p_yes."""
    if p_yes is None:
        return [float(c) for c in cos]
    return fused_scores(cos, p_yes, weight)


@dataclass
class Records:
    """teacher.jsonl's records (qid order of `found`), per-task counts, pairs kept and dropped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_pairs: int = 0
    n_dropped: int = 0


def teacher_records(
    cfg: TeacherConfig, found: list[RetrievedQuery], p_yes: Mapping[str, list[float | None]]
) -> Records:
    """One record per query; with a re-ranker, pairs it rejected (P(Yes) None) are dropped."""
    out = Records()
    for q in found:
        w = task_weight(q.meta.task, cfg.default_weight, cfg.task_weights)
        cands, cos, probs = q.candidates, q.cos, None
        if cfg.reranker:
            row = p_yes[q.meta.qid]
            keep = [i for i, p in enumerate(row) if p is not None]
            out.n_dropped += len(row) - len(keep)
            cands, cos, probs = (
                [cands[i] for i in keep],
                [cos[i] for i in keep],
                [float(row[i]) for i in keep],
            )
        scores = teacher_scores(cos, probs, w)
        out.n_pairs += len(cands)
        t = out.per_task.setdefault(q.meta.task, {"queries": 0, "pairs": 0, "weight": w})
        t["queries"] += 1
        t["pairs"] += len(cands)
        out.records.append(
            {
                "qid": q.meta.qid,
                "task": q.meta.task,
                "weight": w,
                "candidates": cands,
                "cos": cos,
                "p_yes": probs,
                "scores": scores,
            }
        )
    return out


__all__ = ["Records", "task_weight", "teacher_records", "teacher_scores"]
