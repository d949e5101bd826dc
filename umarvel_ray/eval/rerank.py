"""Reranking at evaluation: each query's first-stage top-K, per task and pool, reordered by the
re-ranker (`rerank.score_pairs` on Ray Data), then scored again.

Rules (eval/rerank_options.py names the modes):
- umarvel+: score = cos + w * P(Yes) (`model.fusion`), w per task; order by score desc, ties by id.
- zeroshot: score = P(True) alone, order by it desc, ties by cos desc, then id. RECIPE.md section 4
  gives MM-Embed's zero-shot score as P("True") on the top candidates, with no mixing weight, so
  the re-ranker's score replaces the retriever's inside the top-K (the retriever only chose the K).
- A pair the re-ranker cannot score (undecodable query or candidate, logged and counted) counts as
  P = 0, a "No": it keeps its place only by its cosine (umarvel+) or sinks to the end (zeroshot).
- A (task, qid, did) pair is scored once even when both the local and the global top-K hold it (a
  did names one record in M-BEIR's local pools and their union); its line is read from the first
  pool file it was retrieved from (the local pass runs first).
Each head is the first `rerank_top_k` of the first-stage list (check_rerank_depth ensures K >= the
search depth), so the reranked list has K entries and every R@k is taken over it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import resolve_against
from umarvel_ray.eval.metrics import RetrievalMetrics, Run, evaluate_run
from umarvel_ray.eval.plan import EvalConfig, EvalPlan
from umarvel_ray.eval.rerank_options import rerank_model
from umarvel_ray.model.fusion import fused_scores, rank_fused, task_weight

log = logging.getLogger("umarvel_ray.eval")

PairKey = tuple[str, str, str]  # (task, qid, did)


@dataclass
class Head:
    """One task and pool's first-stage top-K: {qid: [(did, cos), ...]} best first, the pool's ids
    (for the metrics' reachability count) and the pool file the candidates' lines are read from."""

    run: Run
    pool_ids: set[str]
    pool_file: Path


@dataclass
class Reranked:
    """The reranked runs and metrics per task and pool, the pair counts and the SUMMARY line."""

    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    results: dict[str, dict[str, RetrievalMetrics]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


def order_head(
    mode: str, ranking: list[tuple[str, float]], p: list[float | None], weight: float
) -> list[tuple[str, float]]:
    """One query's top-K reordered by the rule of `mode` (module doc); (did, new score) best first."""
    ids = [d for d, _ in ranking]
    cos = [c for _, c in ranking]
    probs = [0.0 if x is None else float(x) for x in p]
    if mode == "zeroshot":
        order = sorted(range(len(ids)), key=lambda i: (-probs[i], -cos[i], ids[i]))
        return [(ids[i], probs[i]) for i in order]
    fused = fused_scores(cos, probs, weight)
    return [(ids[i], fused[i]) for i in rank_fused(ids, cos, probs, weight)]


def _pair_rows(
    plan: EvalPlan, heads: Mapping[tuple[str, str], Head]
) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]], list[str]]:
    """Input rows of the pair-scoring job (one per task, query and pool file; byte ranges filled in
    by `_fill_offsets`), each row's (task, candidate dids), and the files the rows point into."""
    seen: set[PairKey] = set()
    by_row: dict[tuple[str, str, str], list[str]] = {}
    for (task, _pool), head in heads.items():
        for qid, ranking in head.run.items():
            for did, _ in ranking:
                if (task, qid, did) not in seen:
                    seen.add((task, qid, did))
                    by_row.setdefault((task, qid, str(head.pool_file)), []).append(did)
    files = sorted({str(plan.task(t).query_file) for t, _, _ in by_row} | {f for _, _, f in by_row})
    index = {f: i for i, f in enumerate(files)}
    rows, meta = [], []
    for (task, qid, pool_file), dids in by_row.items():
        rows.append(
            {"group": len(rows), "qid": qid, "q_file": index[str(plan.task(task).query_file)], "c_file": index[pool_file]}
        )
        meta.append((task, dids))
    return rows, meta, files


def _fill_offsets(rows: list[dict[str, Any]], meta: list[tuple[str, list[str]]], files: list[str]) -> None:
    """Byte ranges of every row's query line and candidate lines, one scan per file."""
    from umarvel_ray.rerank.offsets import scan_offsets

    wanted: dict[tuple[int, str], set[str]] = {}  # (file, id key) -> ids
    for r, (_, dids) in zip(rows, meta, strict=True):
        wanted.setdefault((r["q_file"], "qid"), set()).add(r["qid"])
        wanted.setdefault((r["c_file"], "did"), set()).update(dids)
    found: dict[int, dict[str, tuple[int, int]]] = {}
    for (i, key), ids in wanted.items():
        got = scan_offsets(Path(files[i]), ids, id_key=key)
        missing = ids - set(got)
        if missing:
            raise RuntimeError(f"{len(missing)} ids not found in {files[i]}, e.g. {sorted(missing)[:3]}")
        found.setdefault(i, {}).update(got)
    for r, (_, dids) in zip(rows, meta, strict=True):
        r["q_off"], r["q_len"] = found[r["q_file"]][r["qid"]]
        r["c_offs"] = [found[r["c_file"]][d][0] for d in dids]
        r["c_lens"] = [found[r["c_file"]][d][1] for d in dids]


def score_heads(cfg: EvalConfig, plan: EvalPlan, heads: Mapping[tuple[str, str], Head]) -> tuple[dict[PairKey, float | None], Any]:
    """P(Yes) (P(True) for zeroshot) of every distinct (task, qid, did) pair of the heads (None:
    rejected), and the job's `PairCounts`."""
    from umarvel_ray.rerank.actor import reranker_pixels
    from umarvel_ray.rerank.pairs import PairInputs
    from umarvel_ray.rerank.pipeline import score_pairs

    rows, meta, files = _pair_rows(plan, heads)
    _fill_offsets(rows, meta, files)
    model = rerank_model(cfg)
    min_px, max_px = reranker_pixels(model.path, model.adapter, model.overrides)
    pool = cfg.rerank_pool
    inputs = PairInputs(
        files=files,
        data_root=str(plan.data_root),
        instructions_path=str(resolve_against(plan.data_root, cfg.embed.instructions)),
        prompt_index=cfg.embed.prompt_index,
        seed=cfg.embed.instruction_seed,
        min_pixels=pool.min_pixels or min_px,
        max_pixels=pool.max_pixels or max_px,
        text_rule=cfg.embed.text_rule,
    )
    p: dict[PairKey, float | None] = {}

    def take(batch: dict[str, np.ndarray]) -> None:
        for g, qid, rank, prob, rej in zip(
            batch["group"], batch["qid"], batch["rank"], batch["p_yes"], batch["reject"], strict=True
        ):
            task, dids = meta[int(g)]
            if rej:
                log.warning("rerank %s %s %s rejected: %s", task, qid, dids[int(rank)], rej)
            p[(task, str(qid), dids[int(rank)])] = None if rej else float(prob)

    counts = score_pairs(model, pool, inputs, rows, take, f"eval rerank ({cfg.rerank})", cfg.embed.ray_address)
    return p, counts


def rerank_heads(cfg: EvalConfig, plan: EvalPlan, heads: Mapping[tuple[str, str], Head]) -> Reranked:
    """Score the heads' pairs, reorder every head, and evaluate the reranked runs."""
    from umarvel_ray.data.mbeir import read_qrels
    from umarvel_ray.progress import summary

    p, counts = score_heads(cfg, plan, heads)
    out = Reranked()
    qrels: dict[str, Any] = {}
    for (task, pool), head in heads.items():
        t = plan.task(task)
        w = task_weight(task, cfg.rerank_weight, cfg.rerank_task_weights)
        run = {
            qid: order_head(cfg.rerank, ranking, [p[(task, qid, d)] for d, _ in ranking], w)
            for qid, ranking in head.run.items()
        }
        out.runs[(task, pool)] = run
        if task not in qrels:
            qrels[task] = read_qrels(t.qrels_file)
        m = evaluate_run(run, qrels[task], t.spec.k, pool_ids=head.pool_ids, queries=t.qids, extra_ks=cfg.k)
        out.results.setdefault(task, {})[pool] = m
    out.counts = {
        "pairs_in": counts.pairs_in,
        "scored": counts.scored,
        "rejected": counts.rejected,
        "actors": counts.actors,
        "gpu": counts.gpu,
        "seconds": round(counts.seconds, 2),
        "pairs_per_s": round(counts.pairs_per_s, 2),
    }
    out.summary = summary(
        f"eval rerank ({cfg.rerank})",
        heads=len(heads),
        top_k=cfg.rerank_top_k,
        **{k: v for k, v in out.counts.items() if k != "seconds"},
        seconds=f"{counts.seconds:.1f}",
    )
    return out


__all__ = ["Head", "Reranked", "order_head", "rerank_heads", "score_heads"]
