"""The teacher's use of the re-ranker pair-scoring job (`umarvel_ray.rerank`), shard by shard.

The retrieved (query, candidate) pairs of the pending shards go to `rerank.score_pairs` (CPU
decode tasks -> `RerankActor` pool -> P(Yes) per pair); `run_reranker` hands each shard to its
caller as soon as all of the shard's pairs are in. This module only maps the teacher's config and
shards onto that job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from umarvel_ray.index.local_pool import RetrievedQuery
from umarvel_ray.rerank.actor import reranker_pixels
from umarvel_ray.rerank.config import PairPoolConfig, RerankModel
from umarvel_ray.rerank.pairs import PairInputs
from umarvel_ray.rerank.pipeline import score_pairs
from umarvel_ray.teacher.config import TeacherConfig

log = logging.getLogger("umarvel_ray.teacher")

ShardPYes = dict[str, list[float | None]]  # qid -> P(Yes) per candidate rank (None: rejected)


def _pair_rows(pending: dict[int, list[RetrievedQuery]], offsets: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One input row per query: its shard, qid, and the byte ranges of its line (file 0, the query
    file) and of its candidates' (file 1, the pool file)."""
    return [
        {
            "group": s,
            "qid": q.meta.qid,
            "q_file": 0,
            "q_off": q.meta.offset,
            "q_len": q.meta.length,
            "c_file": 1,
            "c_offs": [offsets[d][0] for d in q.candidates],
            "c_lens": [offsets[d][1] for d in q.candidates],
        }
        for s, shard in sorted(pending.items())
        for q in shard
    ]


def _job(cfg: TeacherConfig, paths: dict[str, Any], pixels: tuple[int, int]) -> tuple[RerankModel, PairPoolConfig, PairInputs]:
    """The teacher's flat keys as the pair-scoring job's settings."""
    model = RerankModel(
        cfg.reranker or "",
        cfg.reranker_adapter,
        {"dtype": cfg.reranker_dtype} if cfg.reranker_dtype else None,
        cfg.rerank_batch_size,
    )
    pool = PairPoolConfig(
        decode_queries=cfg.decode_queries,
        pairs_per_batch=cfg.pairs_per_batch,
        num_actors=cfg.num_actors,
        actor_num_cpus=cfg.actor_num_cpus,
        decode_num_cpus=cfg.decode_num_cpus,
        torch_threads=cfg.torch_threads,
        use_gpu=cfg.use_gpu,
        ray_progress_bars=cfg.ray_progress_bars,
    )
    inputs = PairInputs(
        files=[paths["query_path"], paths["pool_path"]],
        data_root=paths["data_root"],
        instructions_path=paths["instructions_path"],
        prompt_index=paths["prompt_index"],
        seed=paths["seed"],
        min_pixels=pixels[0],
        max_pixels=pixels[1],
    )
    return model, pool, inputs


class _ShardCollector:
    """P(Yes) of each pending shard as the pipeline's batches arrive (in any order); a shard is
    handed to `commit` the moment its last pair is in, so an interrupted run keeps finished shards."""

    def __init__(self, pending: dict[int, list[RetrievedQuery]], commit: Callable[[int, ShardPYes], None]):
        self.expected = {s: sum(len(q.candidates) for q in shard) for s, shard in pending.items()}
        self.results: dict[int, ShardPYes] = {
            s: {q.meta.qid: [None] * len(q.candidates) for q in shard} for s, shard in pending.items()
        }
        self.received = dict.fromkeys(pending, 0)
        self.commit = commit
        self.rejected = 0

    def take(self, batch: dict[str, np.ndarray]) -> None:
        """Record one output batch: P(Yes) of its valid pairs, a logged reject for the others."""
        for s, qid, rank, p, rej in zip(
            batch["group"], batch["qid"], batch["rank"], batch["p_yes"], batch["reject"], strict=True
        ):
            s = int(s)
            if rej:
                self.rejected += 1
                log.warning("pair %s rank %d rejected: %s", qid, int(rank), rej)
            else:
                self.results[s][str(qid)][int(rank)] = float(p)
            self.received[s] += 1
            if self.received[s] == self.expected[s]:
                self.commit(s, self.results.pop(s))

    def incomplete(self) -> list[int]:
        """Shards still missing pairs (after the pipeline ended: a lost batch, never silently)."""
        return sorted(s for s in self.expected if self.received[s] != self.expected[s])


def run_reranker(
    cfg: TeacherConfig,
    pending: dict[int, list[RetrievedQuery]],
    offsets: dict[str, tuple[int, int]],
    paths: dict[str, Any],
    pixels: tuple[int, int],
    commit: Callable[[int, ShardPYes], None],
) -> int:
    """Score the pending shards on Ray; `commit(shard, p_yes)` each as soon as all its pairs are in.

    Returns the number of rejected pairs (undecodable, or failing alone in the re-ranker).
    """
    collector = _ShardCollector(pending, commit)
    model, pool, inputs = _job(cfg, paths, pixels)
    score_pairs(
        model, pool, inputs, _pair_rows(pending, offsets), collector.take, "teacher rerank", cfg.embed.ray_address
    )
    incomplete = collector.incomplete()
    if incomplete:
        raise RuntimeError(f"re-ranker pipeline ended with incomplete shards {incomplete}")
    return collector.rejected


__all__ = ["ShardPYes", "reranker_pixels", "run_reranker"]
