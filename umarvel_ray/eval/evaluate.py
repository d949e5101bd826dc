"""M-BEIR evaluation end to end: embed -> index -> search -> metrics -> run files and report.

    plan.plan_tasks(cfg)            which tasks / pools can be evaluated (missing files = skipped)
    embeddings.embed_stage(cfg, plan)
                                    query + pool embeddings under out_dir/embeddings (Ray Data),
                                    each input embedded once, reused on a rerun
    evaluate_stage(cfg, plan, emb)  indexes under out_dir/index, search, metrics, TREC runs
                                    (search.py), then the report and the SUMMARY line

`run_evaluation(cfg)` chains the three.

Output layout (out_dir): config.yaml, embeddings/{queries-*,pool-global,pool-local-<task>}/,
index/global.*, index/local/<task>.*, runs/<task>.<pool>.trec, mbeir.json, mbeir.md.
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
from umarvel_ray.eval.report import POOLS, report_dict, write_report
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


def finish_report(
    cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, searched: Searched, t0: float
) -> dict[str, Any]:
    """Write mbeir.json / mbeir.md and return the report dict with the SUMMARY line, the rejected
    rows, and what was embedded / reused / built (`t0`: when the search began)."""
    from umarvel_ray.progress import summary

    results, skipped = searched.results, searched.skipped
    settings = _report_settings(cfg, plan, skipped)
    task_settings = searched.task_settings
    paths = write_report(plan.out_dir, results, settings=settings, task_settings=task_settings, tasks=plan.expected)
    report = report_dict(results, plan.expected, settings=settings, task_settings=task_settings)
    avg = {p: macro_average(r[p].hit for r in results.values() if p in r) for p in POOLS}
    rejected = embedding_rejects(emb)
    for r in rejected[:20]:
        log.warning("rejected at embedding: %s", r)
    line = summary(
        "evaluate",
        tasks=len(results),
        rows_rejected=len(rejected),
        local_avg="-" if avg["local"] is None else f"{100 * avg['local']:.2f}",
        global_avg="-" if avg["global"] is None else f"{100 * avg['global']:.2f}",
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
    return report


def _search_and_report(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, service: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    return finish_report(cfg, plan, emb, search_pools(cfg, plan, emb, service), t0)


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
    ({task: {pool: RetrievalMetrics}}).
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
