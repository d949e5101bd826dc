"""Retrieval over each task's LOCAL training pool (the teacher's candidates, mining's pool=local).

M-BEIR ships no local train pool files, so a task's local pool is the union train pool restricted
to candidates whose did dataset id equals the task's dataset id and whose modality equals the
task's candidate modality. Every sampled query gets its exact top-`top_k` there.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.data import catalogue, mbeir
from umarvel_ray.data.queries import QueryMeta, qid_sort_key

log = logging.getLogger("umarvel_ray.index")


@dataclass
class RetrievedQuery:
    """One sampled query and its local top-k: candidate dids and their cosines, best first."""

    meta: QueryMeta
    candidates: list[str]
    cos: list[float]


def local_pool_mask(
    did_dataset_ids: np.ndarray, modalities: np.ndarray, dataset_id: int, task_id: int
) -> np.ndarray:
    """Rows of the union train pool that form a task's local pool (same dataset, task's cand modality)."""
    cand_modality = catalogue.task_modalities(task_id)[1]
    return (did_dataset_ids == int(dataset_id)) & (modalities == cand_modality)


class LocalPool:
    """Row filter of one task's local pool (`local_pool_mask` on a batch of the union pool's ids and
    modalities); picklable, so search shard actors apply it to their slice of the store."""

    def __init__(self, dataset_id: int, task_id: int) -> None:
        self.dataset_id, self.task_id = int(dataset_id), int(task_id)

    def __call__(self, batch: Any) -> np.ndarray:
        ids = batch.ids.tolist()
        ds = np.fromiter((mbeir.split_id(d)[0] for d in ids), dtype=np.int64, count=len(ids))
        return local_pool_mask(ds, np.asarray(batch.modalities).astype(str), self.dataset_id, self.task_id)


def retrieve_local(
    queries: list[QueryMeta],
    q_dir: Path,
    p_dir: Path,
    top_k: int,
    backend: str,
    device: str,
    shards: int = 0,
    shard_cpus: float = 1.0,
) -> tuple[list[RetrievedQuery], list[str]]:
    """Top-k of every query over its task's local pool; also the qids whose local pool is empty.

    `shards` > 0: the local pools are built by that many search actors from the store on disk
    (`index.service`), so the driver reads the pool's ids and modalities but none of its vectors.
    """
    from umarvel_ray.index import build_index
    from umarvel_ray.index.service import SearchService
    from umarvel_ray.store import read_embeddings

    q_emb = read_embeddings(q_dir, columns=("id", "vector"))
    row_of = {qid: i for i, qid in enumerate(q_emb.ids.tolist())}
    pool = read_embeddings(p_dir, columns=("id", "modality") if shards else ("id", "modality", "vector"))
    assert pool.modalities is not None and q_emb.vectors is not None
    pool_ds = np.fromiter(
        (mbeir.split_id(d)[0] for d in pool.ids.tolist()), dtype=np.int64, count=len(pool.ids)
    )
    pool_mod = pool.modalities.astype(str)
    by_task: dict[tuple[int, int], list[QueryMeta]] = {}
    for m in queries:
        if m.qid in row_of:
            by_task.setdefault((m.dataset_id, m.task_id), []).append(m)
    found: list[RetrievedQuery] = []
    no_pool: list[str] = []
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(SearchService(shards, shard_cpus, device=device)) if shards else None
        for (ds, task_id), metas in sorted(by_task.items()):
            mask = local_pool_mask(pool_ds, pool_mod, ds, task_id)
            if not mask.any():
                no_pool += [m.qid for m in metas]
                log.warning("task %s: empty local pool, %d queries skipped", metas[0].task, len(metas))
                continue
            if service is None:
                assert pool.vectors is not None
                index: Any = build_index(pool.vectors[mask], pool.ids[mask], backend=backend, device=device)
            else:
                keep = LocalPool(ds, task_id)
                index = service.build_from_embeddings(p_dir, row_filter=keep, backend=backend)
            k = min(top_k, int(mask.sum()))
            scores, ids = index.search_arrays(q_emb.vectors[[row_of[m.qid] for m in metas]], k)
            for m, s_row, i_row in zip(metas, scores, ids, strict=True):
                found.append(RetrievedQuery(m, [str(d) for d in i_row], [float(x) for x in s_row]))
            n_pool = int(mask.sum())
            log.info("task %s: %d queries, local pool %d, top-%d", metas[0].task, len(metas), n_pool, k)
    found.sort(key=lambda q: qid_sort_key(q.meta.qid))
    return found, no_pool
