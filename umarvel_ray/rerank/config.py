"""Settings of a pair-scoring job: which re-ranker (`RerankModel`) and how its pool runs (`PairPoolConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umarvel_ray.config import ConfigError, option

USE_GPU_MODES = ("auto", "true", "false")


@dataclass
class PairPoolConfig:
    """How the decode tasks and the re-ranker actor pool run (the teacher's flat keys of the same
    names, the evaluation's `rerank_pool` section)."""

    decode_queries: int = option(4, "queries per CPU decode task batch")
    pairs_per_batch: int = option(64, "pairs per re-ranker actor batch")
    num_actors: int = option(0, "re-ranker actors; 0 = one per GPU, or 1 on CPU")
    actor_num_cpus: float = option(1.0, "CPUs reserved per re-ranker actor")
    decode_num_cpus: float = option(1.0, "CPUs reserved per decode task")
    torch_threads: int = option(0, "torch threads per actor; 0 = actor_num_cpus")
    use_gpu: str = option("auto", "auto (if the cluster has GPUs) | true | false")
    min_pixels: int | None = option(None, "re-ranker image floor; null = its config")
    max_pixels: int | None = option(None, "re-ranker image budget; null = its config")
    ray_progress_bars: bool = option(False, "show Ray Data's own progress bars")


def check_pair_pool(pool: PairPoolConfig, prefix: str = "") -> None:
    """ConfigError naming the key (`prefix` + field) of a setting the pool cannot run with."""
    for name in ("decode_queries", "pairs_per_batch"):
        if getattr(pool, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(pool, name)}")
    for name in ("num_actors", "torch_threads"):
        if getattr(pool, name) < 0:
            raise ConfigError(f"{prefix}{name} must be >= 0, got {getattr(pool, name)}")
    if pool.use_gpu not in USE_GPU_MODES:
        raise ConfigError(f"{prefix}use_gpu must be auto, true or false, got {pool.use_gpu!r}")


@dataclass
class RerankModel:
    """The re-ranker the actors load: `Reranker.load(path, adapter, cfg_overrides=overrides)`, scoring
    `batch_size` pairs per forward pass. `overrides` e.g. {"dtype": "bfloat16"} or, for MM-Embed's
    zero-shot judge on a base model, {"judge": "true_false"}."""

    path: str
    adapter: str | None = None
    overrides: dict[str, Any] | None = None
    batch_size: int = 16


__all__ = ["USE_GPU_MODES", "PairPoolConfig", "RerankModel", "check_pair_pool"]
