"""Indexes, search and metrics of an evaluation: the local pass, then the global pass.

- Indexes live under out_dir/index (global.*, local/<task>.*). One is reused when its saved meta
  exists and its fingerprint (source manifest, id subset, factory, fp16, backend, nprobe),
  recorded next to it, matches; otherwise it is built and saved.
- Local pass: one index per task (its own pool embedding, or an id subset of the global
  embeddings), built, searched and dropped in turn to bound memory.
- Global pass: one index over the global pool, searched by every task.
Each search is scored (`metrics.evaluate_run`) and, with `write_runs`, written as a TREC run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.data.mbeir import read_dids, read_qrels
from umarvel_ray.eval.embeddings import EmbeddingSet
from umarvel_ray.eval.metrics import RetrievalMetrics, evaluate_run, run_from_search
from umarvel_ray.eval.plan import EvalConfig, EvalPlan, TaskPlan
from umarvel_ray.eval.report import run_path, write_trec_run
from umarvel_ray.eval.rerank import Head
from umarvel_ray.io import atomic_write_json, read_json_or_none
from umarvel_ray.store import PoolEmbeddings, manifest_digest

log = logging.getLogger("umarvel_ray.eval")

INDEX_DIR = "index"
INDEX_SOURCE_SUFFIX = ".source.json"  # next to a saved index: what it was built from

QueryVectors = Mapping[str, tuple[list[str], np.ndarray]]  # task -> (embedded qids, their vectors)


def _index_fingerprint(cfg: EvalConfig, source: Path, subset: Sequence[str] | None) -> dict[str, Any]:
    sub = None
    if subset is not None:
        sub = hashlib.sha256("\n".join(sorted(subset)).encode()).hexdigest()
    return {
        "source": str(source),
        "source_manifest_sha256": manifest_digest(source),
        "subset_sha256": sub,
        "factory": cfg.index_factory,
        "fp16": cfg.fp16,
        "backend": cfg.index_backend,
        "nprobe": cfg.nprobe,
    }


def _load_backend(cfg: EvalConfig) -> str | None:
    return None if cfg.index_backend == "auto" else cfg.index_backend


def _load_saved_index(cfg: EvalConfig, path: Path, service: Any) -> Any:
    """The index saved at `path`, loaded in this process or by the service's shard actors."""
    from umarvel_ray.index import load_index, read_index_meta

    read_index_meta(path)
    if service is not None:
        index = service.load(path, backend=_load_backend(cfg))
    else:
        index = load_index(path, device=cfg.index_device, backend=_load_backend(cfg))
    if cfg.nprobe is not None and hasattr(index, "set_search_params"):
        index.set_search_params(nprobe=cfg.nprobe)
    return index


def ensure_index(
    cfg: EvalConfig,
    path: Path,
    source: Path,
    subset: Sequence[str] | None = None,
    store: PoolEmbeddings | None = None,
    built: list[str] | None = None,
    reused: list[str] | None = None,
    service: Any = None,
) -> Any:
    """Load the index saved at `path` if it was built from the same source, else build and save it.

    `subset`: only these ids of `source` (a local pool cut out of the global embeddings).
    `service`: an `index.service.SearchService` whose shard actors build (or load) the index from
    disk instead of this process; it is returned in place of an in-process index.
    """
    from umarvel_ray.index import build_index, build_index_from_embeddings
    from umarvel_ray.index.service import IdSubset

    fingerprint = _index_fingerprint(cfg, source, subset)
    side = path.with_name(path.name + INDEX_SOURCE_SUFFIX)
    if cfg.reuse_indexes and read_json_or_none(side) == fingerprint:
        try:
            index = _load_saved_index(cfg, path, service)
            log.info("reusing index %s (%d vectors)", path, len(index))
            if reused is not None:
                reused.append(str(path))
            return index
        except (FileNotFoundError, ValueError, OSError) as exc:
            log.warning("rebuilding index %s: %s", path, exc)
    side.unlink(missing_ok=True)
    opts = dict(
        factory=cfg.index_factory,
        fp16=cfg.fp16,
        device=cfg.index_device,
        backend=cfg.index_backend,
        nprobe=cfg.nprobe,
    )
    if service is not None:
        opts.pop("device")  # the service's own
        keep = None if subset is None else IdSubset(subset)
        index = service.build_from_embeddings(source, row_filter=keep, **opts)
    elif subset is None:
        index = build_index_from_embeddings(source, **opts)
    else:
        store = store or PoolEmbeddings(source)
        ids, vectors = store.subset(subset)
        index = build_index(vectors, ids, **opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    atomic_write_json(side, fingerprint)
    if built is not None:
        built.append(str(path))
    return index


def load_query_vectors(dirs: Sequence[Path], tasks: Sequence[TaskPlan]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per task: (qids that were embedded, in file order; their vectors)."""
    from umarvel_ray.store import read_embeddings

    by_id: dict[str, np.ndarray] = {}
    dim = 0
    for d in dirs:
        e = read_embeddings(d, columns=("id", "vector"))
        assert e.vectors is not None
        dim = e.vectors.shape[1]
        for i, qid in enumerate(e.ids.tolist()):
            by_id[qid] = e.vectors[i]
    out = {}
    for t in tasks:
        qids = [q for q in t.qids if q in by_id]
        vecs = np.stack([by_id[q] for q in qids]) if qids else np.zeros((0, max(dim, 1)), np.float32)
        out[t.name] = (qids, vecs)
    return out


@dataclass
class Searched:
    """What the search passes produced: metrics and settings per task and pool, what was skipped,
    and which indexes were built or reused (the report and the SUMMARY line are made from it)."""

    results: dict[str, dict[str, RetrievalMetrics]]
    task_settings: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    heads: dict[tuple[str, str], Head] = field(default_factory=dict)  # (task, pool) -> top-K to rerank


def search_and_score(
    cfg: EvalConfig,
    plan: EvalPlan,
    t: TaskPlan,
    pool: str,
    index: Any,
    queries: QueryVectors,
    qrels: Mapping[str, set[str]],
    pool_ids: set[str],
    heads: dict[tuple[str, str], Head] | None = None,
    pool_file: Path | None = None,
) -> tuple[RetrievalMetrics, dict[str, Any]]:
    """Search task `t`'s embedded queries in `index`, score the run, write it as a TREC file;
    returns the metrics and what the report records of this (task, pool).

    With reranking on, the search goes `rerank_top_k` deep and the top-K go to `heads` (with
    `pool_file`, where the candidates' lines are read); the metrics and the run file stay those of
    the first `plan.depth`, as without reranking."""
    qids, qvecs = queries[t.name]
    keep = cfg.rerank_top_k if cfg.rerank != "none" and heads is not None else 0
    depth = max(plan.depth, keep)
    t0 = time.perf_counter()
    if qids:
        scores, ids = index.search_arrays(qvecs, depth, batch_size=cfg.search_batch_size)
    else:
        scores, ids = np.zeros((0, depth), np.float32), np.zeros((0, depth), object)
    run = run_from_search(qids, scores[:, : plan.depth], [row[: plan.depth] for row in ids])
    if keep and heads is not None and pool_file is not None:
        heads[(t.name, pool)] = Head(run_from_search(qids, scores[:, :keep], [r[:keep] for r in ids]), pool_ids, pool_file)
    metrics = evaluate_run(run, qrels, t.spec.k, pool_ids=pool_ids, queries=t.qids, extra_ks=cfg.k)
    info: dict[str, Any] = {
        "pool_size": len(index),
        "index_factory": getattr(index, "factory", ""),
        "search_seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.write_runs:
        p = run_path(plan.out_dir, t.name, pool)
        info["run_lines"] = write_trec_run(p, run, f"{cfg.run_id}-{pool}")
        info["run_file"] = str(p)
    log.debug(  # the job prints the whole table (mbeir.md) at the end
        "%s %s: R@%d=%.4f over %d queries (pool %d)",
        t.name,
        pool,
        t.spec.k,
        metrics.hit,
        metrics.n_queries,
        len(index),
    )
    return metrics, info


def local_pass(
    cfg: EvalConfig,
    plan: EvalPlan,
    emb: EmbeddingSet,
    queries: QueryVectors,
    qrels: Mapping[str, Mapping[str, set[str]]],
    out: Searched,
    service: Any,
) -> None:
    """Every task's local pool: one index at a time (built, searched, dropped) to bound memory."""
    idx_dir = plan.out_dir / INDEX_DIR
    store = PoolEmbeddings(emb.global_pool) if emb.global_pool is not None else None
    for t in plan.tasks:
        if "local" not in t.pools:
            continue
        assert t.pool_file is not None
        wanted = read_dids(t.pool_file)
        if t.name in emb.local_pools:
            src, subset, how = emb.local_pools[t.name], None, "local-embedding"
        elif store is not None:
            src, subset, how = store.directory, wanted, "global-subset"
        else:
            out.skipped[f"{t.name}/local"] = "no embeddings for the local pool"
            continue
        index = ensure_index(cfg, idx_dir / "local" / t.name, src, subset, store, out.built, out.reused, service)
        m, info = search_and_score(
            cfg, plan, t, "local", index, queries, qrels[t.name], set(index.ids.tolist()), out.heads, t.pool_file
        )
        out.results[t.name]["local"] = m
        missing = len(set(wanted)) - len(index)
        if missing:  # rejected at embedding time, or absent from the global embeddings
            log.warning(
                "%s local: %d pool ids have no embedding (their queries may be unreachable)", t.name, missing
            )
        out.task_settings[t.name]["local"] = {
            "source": how,
            "pool_file": str(t.pool_file),
            "pool_file_rows": len(wanted),
            "pool_ids_without_embedding": missing,
            **info,
        }
        del index


def global_pass(
    cfg: EvalConfig,
    plan: EvalPlan,
    emb: EmbeddingSet,
    queries: QueryVectors,
    qrels: Mapping[str, Mapping[str, set[str]]],
    out: Searched,
    service: Any,
) -> None:
    """One index over the global pool, searched by every task evaluated against it."""
    global_tasks = [t for t in plan.tasks if "global" in t.pools]
    if global_tasks and emb.global_pool is not None:
        path = plan.out_dir / INDEX_DIR / "global"
        index = ensure_index(cfg, path, emb.global_pool, None, None, out.built, out.reused, service)
        gids = set(index.ids.tolist())
        for t in global_tasks:
            m, info = search_and_score(
                cfg, plan, t, "global", index, queries, qrels[t.name], gids, out.heads, plan.global_pool_file
            )
            out.results[t.name]["global"] = m
            out.task_settings[t.name]["global"] = {"pool_file": str(plan.global_pool_file), **info}
        del index
    elif global_tasks:
        for t in global_tasks:
            out.skipped[f"{t.name}/global"] = "no global pool embeddings"


def search_pools(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, service: Any) -> Searched:
    """The local pass, then the global pass, over the plan's tasks; `service` (or None: in this
    process) holds the indexes."""
    queries = load_query_vectors(emb.queries, plan.tasks)
    out = Searched(results={}, task_settings={}, skipped=dict(plan.skipped))
    for t in plan.tasks:
        qids, _ = queries[t.name]
        out.task_settings[t.name] = {
            "query_file": str(t.query_file),
            "n_queries_file": len(t.qids),
            "n_queries_embedded": len(qids),
            "depth": plan.depth,
        }
        out.results[t.name] = {}
    qrels = {t.name: read_qrels(t.qrels_file) for t in plan.tasks}
    local_pass(cfg, plan, emb, queries, qrels, out, service)
    global_pass(cfg, plan, emb, queries, qrels, out, service)
    out.results = {k: v for k, v in out.results.items() if v}
    return out


__all__ = [
    "INDEX_DIR",
    "Searched",
    "ensure_index",
    "global_pass",
    "load_query_vectors",
    "local_pass",
    "search_and_score",
    "search_pools",
]
