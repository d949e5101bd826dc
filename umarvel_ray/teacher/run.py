"""Distillation teacher scores for stage 5 (the U-MARVEL recipe's distillation teacher).

1. Stratified sample (`teacher/sample.py`): per M-BEIR training task (dataset x task_id, e.g.
   "mscoco_task0"), a seeded `fraction` (10%) of its training queries, at least `min_per_task`,
   at most `max_per_task`.
2. Embed the sampled queries and the union training pool with the (stage-4) embedder through the
   Ray Data embedding pipeline (restartable; reused when complete).
3. Per task, exact top-`top_k` (50) over that task's LOCAL training pool (`index/local_pool.py`).
4. P(Yes) of the re-ranker for every (query, candidate) pair (`teacher/rerank.py`, the Ray Data
   re-ranker pipeline), restartable by shard (`teacher/shards.py`).
5. teacher score = cos + w * P(Yes), w per task (`task_weights`, default `default_weight`;
   `teacher/scores.py`); without a re-ranker (`reranker=null`) the teacher is cos alone, and the
   summary says so.

Outputs in `output_dir`: `teacher.jsonl` (one line per query, sorted by qid:
`{"qid", "task", "weight", "candidates", "cos", "p_yes", "scores"}`; `p_yes` is null without a
re-ranker), `teacher_quality.json` (fused vs cos on the labelled positives, `teacher/quality.py`),
`summary.json`, `config.yaml`, and the re-ranker's `_shards/` (its restart unit).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from umarvel_ray.data.artefacts import write_teacher, write_teacher_quality
from umarvel_ray.data.holdout import is_heldout
from umarvel_ray.data.queries import QueryMeta, qid_sort_key, read_query_meta
from umarvel_ray.embed.ensure import ensure_embeddings, subset_input
from umarvel_ray.embed.train_pool import SUMMARY_NAME, start_run
from umarvel_ray.index.local_pool import retrieve_local
from umarvel_ray.io import atomic_write_json
from umarvel_ray.teacher.config import TeacherConfig, TeacherResult, validate_config
from umarvel_ray.teacher.quality import describe, teacher_quality
from umarvel_ray.teacher.sample import sample_lines, stratified_sample
from umarvel_ray.teacher.scores import Records, teacher_records
from umarvel_ray.teacher.shards import Scored, score_shards

log = logging.getLogger("umarvel_ray.teacher")


def _embed_sample(
    cfg: TeacherConfig, root: Path, qf: Path, pf: Path, out: Path, chosen: list[QueryMeta]
) -> tuple[Path, Path]:
    """(query, pool) embedding directories, complete: the sampled queries' and the union pool's.

    The sampled lines go to a subset file beside their embeddings; the default query directory is
    named after the sample's bytes, so a new fraction or seed never collides with an old one.
    """
    lines, tag = sample_lines(qf, chosen)
    q_dir = (
        Path(cfg.query_embeddings).expanduser()
        if cfg.query_embeddings
        else out / "embeddings" / f"queries-{tag}"
    )
    p_dir = Path(cfg.pool_embeddings).expanduser() if cfg.pool_embeddings else out / "embeddings" / "pool"
    q_input = subset_input(qf, lines, q_dir, f"{qf.stem}.sample-{tag}.jsonl")
    common = dict(data_root=root, model=cfg.model, adapter=cfg.adapter)
    ensure_embeddings(cfg.embed, kind="candidate", input_path=pf, output_dir=p_dir, **common)
    ensure_embeddings(cfg.embed, kind="query", input_path=q_input, output_dir=q_dir, **common)
    return q_dir, p_dir


def _write_summary(
    cfg: TeacherConfig,
    out: Path,
    counts: dict[str, Any],
    recs: Records,
    sample: dict[str, list[str]],
    dirs: tuple[Path, Path],
    no_pool: list[str],
    seconds: float,
) -> None:
    """summary.json: the counts, per task too, the sample and the settings that produced them."""
    atomic_write_json(
        out / SUMMARY_NAME,
        {
            "counts": counts,
            "per_task": dict(sorted(recs.per_task.items())),
            "sampled_per_task": {t: len(q) for t, q in sample.items()},
            "fraction": cfg.fraction,
            "top_k": cfg.top_k,
            "teacher": "cos + w * p_yes" if cfg.reranker else "cos (no re-ranker given)",
            "query_embeddings": str(dirs[0]),
            "pool_embeddings": str(dirs[1]),
            "no_local_pool": sorted(no_pool, key=qid_sort_key),
            "seconds": round(seconds, 2),
        },
    )


def _sample(cfg: TeacherConfig, metas: dict[str, QueryMeta]) -> dict[str, list[str]]:
    """The stratified sample; with `holdout_fraction` > 0 drawn from the held-out slice only, so the
    teacher distils queries stages 3-4 and the re-ranker never trained on. `fraction` stays a
    fraction of all of a task's queries (at most the whole held-out slice)."""
    if cfg.holdout_fraction <= 0:
        return stratified_sample(metas, cfg.fraction, cfg.seed, cfg.min_per_task, cfg.max_per_task)
    held = {q: m for q, m in metas.items() if is_heldout(q, cfg.holdout_fraction)}
    share = min(1.0, cfg.fraction / cfg.holdout_fraction)
    log.info("sampling from the %d held-out queries (holdout_fraction %s)", len(held), cfg.holdout_fraction)
    return stratified_sample(held, share, cfg.seed, cfg.min_per_task, cfg.max_per_task)


def run_teacher_scoring(cfg: TeacherConfig) -> TeacherResult:
    """Sample, embed, retrieve top-k per local pool, score with the re-ranker; write teacher.jsonl."""
    from umarvel_ray.progress import summary

    t0 = time.perf_counter()
    root, qf, pf, out = start_run(cfg, validate_config)

    metas, _, n_read, invalid = read_query_meta(qf)
    sample = _sample(cfg, metas)
    chosen = sorted((metas[q] for qids in sample.values() for q in qids), key=lambda m: m.offset)
    log.info("sampled %d of %d queries over %d tasks", len(chosen), len(metas), len(sample))
    q_dir, p_dir = _embed_sample(cfg, root, qf, pf, out, chosen)

    found, no_pool = retrieve_local(
        chosen, q_dir, p_dir, cfg.top_k, cfg.index_backend, cfg.index_device,
        cfg.index_shards, cfg.index_shard_cpus,
    )  # fmt: skip
    scored = score_shards(cfg, found, root, qf, pf, out) if cfg.reranker else Scored()
    recs = teacher_records(cfg, found, scored.p_yes)
    teacher_path = write_teacher(out, recs.records)
    quality = teacher_quality(recs.records, {q: m.positives for q, m in metas.items()}, cfg.holdout_fraction > 0)
    write_teacher_quality(out, quality)
    log.info("%s", describe(quality))
    seconds = time.perf_counter() - t0
    counts: dict[str, Any] = {
        "queries_read": n_read,
        "queries_invalid": invalid,
        "tasks": len(sample),
        "queries_sampled": len(chosen),
        "queries_not_embedded": len(chosen) - len(found) - len(no_pool),
        "queries_no_local_pool": len(no_pool),
        "queries_written": len(recs.records),
        "pairs": recs.n_pairs,
        "pairs_rejected": scored.pairs_rejected,
        "pairs_dropped": recs.n_dropped,
        "shards_written": scored.shards_written,
        "shards_skipped": scored.shards_skipped,
        "reranker": cfg.reranker or "none (teacher = cos only)",
        "cos_mrr": quality["cos"]["mrr"],
        "fused_mrr": quality["fused"]["mrr"],
    }
    _write_summary(cfg, out, counts, recs, sample, (q_dir, p_dir), no_pool, seconds)
    if not cfg.reranker:
        log.warning("no re-ranker given: teacher scores are the embedder's cos only")
    line = summary("teacher", **counts, seconds=f"{seconds:.1f}", output=str(teacher_path))
    return TeacherResult(out, counts, seconds, line, teacher_path=teacher_path)
