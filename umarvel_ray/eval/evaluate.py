"""M-BEIR evaluation end to end: embed -> index -> search -> metrics -> run files and report.

    plan.plan_tasks(cfg)            which tasks / pools can be evaluated (missing files = skipped)
    embeddings.embed_stage(cfg, plan)
                                    query + pool embeddings under out_dir/embeddings (Ray Data),
                                    each input embedded once, reused on a rerun
    evaluate_stage(cfg, plan, emb)  indexes under out_dir/index, search, metrics, TREC runs
                                    (search.py), then the report and the SUMMARY line

    eval.rerank.rerank_heads        with rerank=umarvel+|zeroshot: each query's top-K reordered by
                                    the re-ranker (Ray Data actors), then scored again

`run_evaluation(cfg)` chains them.

Output layout (out_dir): config.yaml, embeddings/{queries-*,pool-global,pool-local-<task>}/,
index/global.*, index/local/<task>.*, runs/<task>.<pool>.trec, mbeir.json, mbeir.md; reranked:
mbeir.json/md hold the reranked numbers, retrieval.json/md the first stage's, and
rerank/runs/<task>.<pool>.trec the reranked runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, check_model_dir, require_absolute, save_config
from umarvel_ray.eval.embeddings import EmbeddingSet, embed_stage, embedding_rejects
from umarvel_ray.eval.metrics import macro_average
from umarvel_ray.eval.plan import (
    EvalConfig,
    EvalPlan,
    instruction_settings,
    plan_indexes,
    plan_tasks,
    pool_sizes,
)
from umarvel_ray.eval.report import POOLS, report_dict, run_path, write_report, write_trec_run
from umarvel_ray.eval.rerank import Reranked, rerank_heads
from umarvel_ray.eval.rerank_options import rerank_label, rerank_settings
from umarvel_ray.eval.search import Searched, search_pools

log = logging.getLogger("umarvel_ray.eval")


def _report_settings(cfg: EvalConfig, plan: EvalPlan, skipped: dict[str, str]) -> dict[str, Any]:
    """The settings mbeir.json records: what was evaluated, how, and what was skipped."""
    return {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "data_root": str(plan.data_root),
        "instruction": instruction_settings(cfg),
        "k": list(cfg.k),
        "depth": plan.depth,
        "pools": list(cfg.pools),
        "index_factory": cfg.index_factory,
        "fp16": cfg.fp16,
        "backend": cfg.index_backend,
        "local_source": cfg.local_source,
        "global_pool": str(plan.global_pool_file) if plan.global_pool_file else None,
        "global_pool_from_local_pools": [str(p) for p in plan.global_sources],
        "skipped": skipped,
    }


def _averages(results: Any) -> dict[str, float | None]:
    return {p: macro_average(r[p].hit for r in results.values() if p in r) for p in POOLS}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _write_reranked(
    cfg: EvalConfig, plan: EvalPlan, searched: Searched, reranked: Reranked, settings: dict[str, Any]
) -> tuple[dict[str, Path], dict[str, Any]]:
    """A reranked evaluation's files: the first-stage table as retrieval.json/md, the reranked one
    as mbeir.json/md (titled with the reranker, K and w), the reranked runs under rerank/runs/."""
    first = write_report(
        plan.out_dir, searched.results, settings=settings, task_settings=searched.task_settings,
        tasks=plan.expected, name="retrieval", title="First stage (before reranking)",
    )  # fmt: skip
    settings = {**settings, "rerank": {**rerank_settings(cfg), "pairs": reranked.counts}}
    paths = write_report(
        plan.out_dir, reranked.results, settings=settings, task_settings=searched.task_settings,
        tasks=plan.expected, title=rerank_label(cfg),
    )  # fmt: skip
    if cfg.write_runs:
        for (task, pool), run in reranked.runs.items():
            write_trec_run(run_path(plan.out_dir / "rerank", task, pool), run, f"{cfg.run_id}-{pool}-rerank")
    paths.update({"retrieval_json": first["json"], "retrieval_markdown": first["markdown"]})
    return paths, settings


def finish_report(
    cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, searched: Searched, t0: float, reranked: Reranked | None = None
) -> dict[str, Any]:
    """Write mbeir.json / mbeir.md and return the report dict with the SUMMARY line, the rejected
    rows, and what was embedded / reused / built (`t0`: when the search began).

    With `reranked`, mbeir.* hold the reranked numbers (`averages`, `results`) and the first stage
    goes to retrieval.* (`retrieval_averages`, `retrieval_results` in the dict)."""
    from umarvel_ray.progress import summary

    skipped = searched.skipped
    settings = _report_settings(cfg, plan, skipped)
    if reranked is None:
        results = searched.results
        paths = write_report(
            plan.out_dir, results, settings=settings, task_settings=searched.task_settings, tasks=plan.expected
        )
    else:
        results = reranked.results
        paths, settings = _write_reranked(cfg, plan, searched, reranked, settings)
    report = report_dict(results, plan.expected, settings=settings, task_settings=searched.task_settings)
    avg, first = _averages(results), _averages(searched.results)
    rejected = embedding_rejects(emb)
    for r in rejected[:20]:
        log.warning("rejected at embedding: %s", r)
    extra = {} if reranked is None else {
        "rerank": cfg.rerank, "retrieval_local_avg": _pct(first["local"]), "retrieval_global_avg": _pct(first["global"]),
    }  # fmt: skip
    line = summary(
        "evaluate",
        tasks=len(results),
        rows_rejected=len(rejected),
        local_avg=_pct(avg["local"]),
        global_avg=_pct(avg["global"]),
        **extra,
        local_tasks=report["averages"]["local"]["n_tasks"],
        global_tasks=report["averages"]["global"]["n_tasks"],
        skipped=len(skipped),
        embedded=len(emb.embedded),
        reused_embeddings=len(emb.reused),
        indexes_built=len(searched.built),
        indexes_reused=len(searched.reused),
        seconds=f"{time.perf_counter() - t0:.1f}",
        report=str(paths["markdown"]),
    )
    report.update(
        {
            "summary": line,
            "skipped": skipped,
            "rejected": rejected,
            "paths": {k: str(v) for k, v in paths.items()},
            "embedded": list(emb.embedded),
            "reused_embeddings": list(emb.reused),
            "indexes_built": searched.built,
            "indexes_reused": searched.reused,
            "results": results,
        }
    )
    if reranked is not None:
        first_dict = report_dict(searched.results, plan.expected)
        report.update(
            {
                "retrieval_averages": first_dict["averages"],
                "retrieval_results": searched.results,
                "rerank": {**rerank_settings(cfg), "pairs": reranked.counts, "summary": reranked.summary},
            }
        )
    return report


def _search_and_report(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, service: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    searched = search_pools(cfg, plan, emb, service)
    reranked = rerank_heads(cfg, plan, searched.heads) if cfg.rerank != "none" else None
    return finish_report(cfg, plan, emb, searched, t0, reranked)


def evaluate_stage(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet) -> dict[str, Any]:
    """Indexes (built or reused), search, metrics, run files, report; returns the report dict.

    With `index_shards` > 0 one search service (its shard actors) serves every pool in turn and is
    closed before this returns."""
    from umarvel_ray.index.service import SearchService

    if cfg.index_shards <= 0:
        return _search_and_report(cfg, plan, emb, None)
    with SearchService(cfg.index_shards, cfg.index_shard_cpus, device=cfg.index_device) as service:
        return _search_and_report(cfg, plan, emb, service)


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Embed -> index -> search -> metrics on an M-BEIR directory (real or toy); restartable.

    Before any embedding: every input file is validated (InputError with FILE:LINE lines) and
    the index factory is checked against every pool's size (`plan_indexes`).

    Returns the report dict (`tasks`, `averages`, `settings`, as in mbeir.json) plus `summary`
    (the SUMMARY line), `skipped`, `paths`, what was embedded / reused / built, and `results`
    ({task: {pool: RetrievalMetrics}}). With rerank != none, `averages` / `results` are the
    reranked numbers and `retrieval_averages` / `retrieval_results` the first stage's; `rerank`
    holds the reranker's settings, pair counts and its SUMMARY line.
    """
    require_absolute(cfg)
    check_model_dir(cfg.model, "model")
    t0 = time.perf_counter()
    plan = plan_tasks(cfg)  # query and qrels files validated here
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, plan.out_dir)
    if not plan.tasks:
        raise ConfigError(f"nothing to evaluate in {plan.data_root}: {plan.skipped}")
    from umarvel_ray.embed.config import model_dim

    plan_indexes(cfg, pool_sizes(plan), model_dim(Path(cfg.model).expanduser()))
    emb = embed_stage(cfg, plan)
    report = evaluate_stage(cfg, plan, emb)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


__all__ = ["evaluate_stage", "finish_report", "run_evaluation"]
