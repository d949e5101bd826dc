"""`score_pairs`: the pair-scoring job on Ray Data, CPU decode tasks -> a pool of `RerankActor`s.

`decode_queries` query rows per decode task (`pairs.decode_pairs`) feed an actor pool (one
`Reranker.load` per actor, a GPU each when the cluster has GPUs and `use_gpu` allows it) that gives
P(Yes) per pair in batches of `pairs_per_batch`. Every output batch is handed to the caller's
`take` as it arrives (in any order), so the caller can commit results incrementally.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from umarvel_ray.rerank.actor import RerankActor, use_gpu
from umarvel_ray.rerank.config import PairPoolConfig, RerankModel
from umarvel_ray.rerank.pairs import PairInputs, decode_pairs

OutputBatch = dict[str, np.ndarray]  # group, qid, rank, p_yes, reject


@dataclass
class PairCounts:
    """What one `score_pairs` call did: pairs_in = scored + rejected; wall seconds; pairs/s."""

    pairs_in: int
    scored: int
    rejected: int
    seconds: float
    actors: int
    gpu: bool

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_in / self.seconds if self.seconds > 0 else 0.0


def pair_dataset(
    model: RerankModel, pool: PairPoolConfig, inputs: PairInputs, rows: list[dict[str, Any]], gpu: bool
) -> tuple[Any, int]:
    """The lazy Dataset (decode tasks -> actor pool) over `rows` (see `pairs`), and its actor count."""
    import ray.data

    from umarvel_ray.runtime import actor_pool, cluster_gpus

    n_blocks = max(1, math.ceil(len(rows) / pool.decode_queries))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
        decode_pairs,
        batch_size=pool.decode_queries,
        batch_format="numpy",
        fn_kwargs=inputs.decode_kwargs(),
        num_cpus=pool.decode_num_cpus,
    )
    n_actors = pool.num_actors or (max(1, int(cluster_gpus())) if gpu else 1)
    threads = pool.torch_threads or max(1, int(pool.actor_num_cpus))
    ds = ds.map_batches(
        RerankActor,
        fn_constructor_kwargs={
            "reranker": model.path,
            "adapter": model.adapter,
            "overrides": model.overrides,
            "batch_size": model.batch_size,
            "torch_threads": 0 if gpu and not pool.torch_threads else threads,
            "use_gpu": gpu,
        },
        batch_size=pool.pairs_per_batch,
        batch_format="numpy",
        num_cpus=pool.actor_num_cpus,
        num_gpus=1 if gpu else 0,
        **actor_pool(n_actors, n_actors),
    )
    return ds, n_actors


def score_pairs(
    model: RerankModel,
    pool: PairPoolConfig,
    inputs: PairInputs,
    rows: list[dict[str, Any]],
    take: Callable[[OutputBatch], None],
    what: str = "rerank",
    ray_address: str | None = None,
) -> PairCounts:
    """Score every pair of `rows` on Ray (started or joined here); `take(batch)` each output batch.

    Logs progress (pairs/s, ETA) under `what`; returns the counts. Raises RuntimeError when the
    pipeline ends with fewer pairs than `rows` hold (a lost batch is never silent).
    """
    from ray.data import DataContext

    from umarvel_ray.progress import Progress
    from umarvel_ray.runtime import ensure_ray

    ensure_ray(ray_address)
    gpu = use_gpu(pool.use_gpu)
    expected = sum(len(r["c_offs"]) for r in rows)
    t0 = time.perf_counter()
    counts = PairCounts(0, 0, 0, 0.0, 0, gpu)
    if expected:
        ds, counts.actors = pair_dataset(model, pool, inputs, rows, gpu)
        ctx = DataContext.get_current()
        old_bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = pool.ray_progress_bars
        progress = Progress(what, total=expected, unit="pairs")
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                take(batch)
                n, bad = len(batch["qid"]), int(np.count_nonzero(np.asarray(batch["reject"], dtype=object) != ""))
                counts.pairs_in += n
                counts.rejected += bad
                counts.scored += n - bad
                progress.update(n)
        finally:
            ctx.enable_progress_bars = old_bars
    counts.seconds = time.perf_counter() - t0
    if counts.pairs_in != expected:
        raise RuntimeError(f"{what}: the pipeline returned {counts.pairs_in} of {expected} pairs")
    return counts


__all__ = ["OutputBatch", "PairCounts", "pair_dataset", "score_pairs"]
