"""M-BEIR retrieval metrics on a run `{qid: [(did, score), ...]}` and qrels `{qid: {did}}`.

- hit rate@k: 1 if any positive is in the top k. This is what M-BEIR / U-MARVEL call
  "Recall@k" and what the 16-task table reports.
- recall@k: the fraction of a query's positives found in the top k (true recall; differs from
  the hit rate only for queries with several positives).
- MRR@k: 1/rank of the first positive within the top k (0 if none); `mrr` is the same over the
  whole returned list.

Ranks are taken from the list order as given (runs come sorted by score desc with ties already
broken deterministically by the index), so equal scores never make a metric non-deterministic.
Queries in the run without qrels are excluded and counted; queries in qrels but absent from the
run (e.g. rejected at embedding time) count as misses and are counted; queries none of whose
positives are in the pool count as misses and are counted (needs `pool_ids`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from umarvel_ray.index.base import PAD_ID  # index padding when k exceeds the pool; never a real id

Run = dict[str, list[tuple[str, float]]]
Qrels = Mapping[str, Collection[str]]



@dataclass(frozen=True)
class QueryScores:
    """One query's numbers (kept so callers can slice per modality, per dataset, ...)."""

    hit: float
    recall: float
    rr_at_k: float
    rr: float
    reachable: bool
    first_rank: int | None = None  # 1-based rank of the first positive in the full list

    def hit_at(self, k: int) -> float:
        return 1.0 if self.first_rank is not None and self.first_rank <= k else 0.0


@dataclass
class RetrievalMetrics:
    """Averages over the evaluated queries of one task and pool; fractions in [0, 1]."""

    k: int
    hit: float
    recall: float
    mrr_at_k: float
    mrr: float
    n_queries: int
    hits_at: dict[int, float] = field(default_factory=dict)
    n_no_qrels: int = 0
    n_missing_from_run: int = 0
    n_unreachable: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hits_at"] = {str(k): v for k, v in self.hits_at.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrievalMetrics:
        d = dict(d)
        d["hits_at"] = {int(k): float(v) for k, v in d.get("hits_at", {}).items()}
        return cls(**d)


def _ranked(ranking: Sequence[tuple[str, float]], qid: str) -> list[str]:
    """Ids in list order, padding dropped; rejects an unsorted list (a bug upstream)."""
    ids = []
    prev = np.inf
    for did, score in ranking:
        if did == PAD_ID:
            continue
        s = float(score)
        if s > prev:
            raise ValueError(f"run for query {qid!r} is not sorted by score desc ({s} after {prev})")
        prev = s
        ids.append(did)
    return ids


def query_scores(
    ranked_ids: Sequence[str], positives: Collection[str], k: int, reachable: bool = True
) -> QueryScores:
    """Hit/recall/RR for one ranked id list (duplicates in the list count once)."""
    pos = set(positives)
    if not pos:
        raise ValueError("query without positives")
    first = next((r for r, did in enumerate(ranked_ids, start=1) if did in pos), None)
    found = pos.intersection(ranked_ids[:k])
    return QueryScores(
        hit=1.0 if first is not None and first <= k else 0.0,
        recall=len(found) / len(pos),
        rr_at_k=1.0 / first if first is not None and first <= k else 0.0,
        rr=1.0 / first if first is not None else 0.0,
        reachable=reachable,
        first_rank=first,
    )


def per_query(
    run: Mapping[str, Sequence[tuple[str, float]]],
    qrels: Qrels,
    k: int,
    pool_ids: Collection[str] | None = None,
    queries: Iterable[str] | None = None,
) -> tuple[dict[str, QueryScores], dict[str, int]]:
    """Per-query scores plus the exclusion counts (see module doc for which query goes where).

    `queries` is the evaluated query set (default: every qid in the run or qrels).
    """
    if k <= 0:
        raise ValueError("k must be > 0")
    wanted = list(dict.fromkeys(queries)) if queries is not None else list(dict.fromkeys([*run, *qrels]))
    out: dict[str, QueryScores] = {}
    counts = {"n_no_qrels": 0, "n_missing_from_run": 0, "n_unreachable": 0}
    for qid in wanted:
        pos = qrels.get(qid)
        if not pos:
            counts["n_no_qrels"] += 1
            continue
        reachable = pool_ids is None or any(p in pool_ids for p in pos)
        if not reachable:
            counts["n_unreachable"] += 1
        if qid not in run:
            counts["n_missing_from_run"] += 1
            out[qid] = QueryScores(0.0, 0.0, 0.0, 0.0, reachable)
            continue
        out[qid] = query_scores(_ranked(run[qid], qid), pos, k, reachable)
    return out, counts


def evaluate_run(
    run: Mapping[str, Sequence[tuple[str, float]]],
    qrels: Qrels,
    k: int,
    pool_ids: Collection[str] | None = None,
    queries: Iterable[str] | None = None,
    extra_ks: Sequence[int] = (1, 5, 10),
) -> RetrievalMetrics:
    """Macro-averaged metrics of one task/pool at its k, plus hit rate at `extra_ks`."""
    scores, counts = per_query(run, qrels, k, pool_ids, queries)
    n = len(scores)

    def mean(values: Iterable[float]) -> float:
        return float(np.mean(list(values))) if n else 0.0

    hits_at = {kk: mean(s.hit_at(kk) for s in scores.values()) for kk in sorted(set(extra_ks) | {k})}
    return RetrievalMetrics(
        k=k,
        hit=mean(s.hit for s in scores.values()),
        recall=mean(s.recall for s in scores.values()),
        mrr_at_k=mean(s.rr_at_k for s in scores.values()),
        mrr=mean(s.rr for s in scores.values()),
        n_queries=n,
        hits_at=hits_at,
        **counts,
    )


def hit_rate_at_k(run: Mapping[str, Sequence[tuple[str, float]]], qrels: Qrels, k: int) -> float:
    """M-BEIR "Recall@k" (hit rate) over the run's queries that have qrels."""
    return evaluate_run(run, qrels, k, queries=run.keys(), extra_ks=()).hit


def recall_at_k(run: Mapping[str, Sequence[tuple[str, float]]], qrels: Qrels, k: int) -> float:
    """True recall@k (fraction of positives retrieved) over the run's queries that have qrels."""
    return evaluate_run(run, qrels, k, queries=run.keys(), extra_ks=()).recall


def mrr_at_k(run: Mapping[str, Sequence[tuple[str, float]]], qrels: Qrels, k: int) -> float:
    """MRR@k over the run's queries that have qrels."""
    return evaluate_run(run, qrels, k, queries=run.keys(), extra_ks=()).mrr_at_k


def run_from_search(
    qids: Sequence[str], scores: np.ndarray, ids: Sequence[Sequence[str]] | np.ndarray
) -> Run:
    """Turn an index's (scores [nq, k], ids [nq][k]) into a run dict, dropping padding."""
    if len(qids) != len(scores) or len(qids) != len(ids):
        raise ValueError(f"{len(qids)} qids, {len(scores)} score rows, {len(ids)} id rows")
    run: Run = {}
    for qid, srow, irow in zip(qids, np.asarray(scores, np.float32), ids, strict=True):
        if qid in run:
            raise ValueError(f"duplicate query id {qid!r}")
        run[qid] = [(str(d), float(s)) for d, s in zip(irow, srow, strict=True) if d != PAD_ID]
    return run


def macro_average(values: Iterable[float]) -> float | None:
    """Plain mean over tasks (the M-BEIR headline is the unweighted mean of the task scores)."""
    vals = [float(v) for v in values]
    return float(np.mean(vals)) if vals else None
