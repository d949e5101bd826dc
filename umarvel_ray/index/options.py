"""`SearchOptions`: the config group of every step that searches a pool (evaluate, mine_negatives,
teacher_scores), shared by inheritance so that the YAML keys stay flat and are spelled once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umarvel_ray.config import ConfigError, option

SHARDS_HELP = (
    "search pool sharding: 0 = one index in this process (default); N > 0 = N Ray actors each build "
    "and hold 1/N of the pool (one per node/GPU, SPREAD) and every search fans out to them and "
    "merges exactly (same ids, order and ties as 0). Use it when the pool's vectors do not fit one "
    "process: N >= pool bytes / memory one node or GPU can give the index"
)
SHARD_CPUS_HELP = "CPUs reserved per search shard actor (also its faiss/torch threads, at least 1)"


def index_shards_option() -> Any:
    """The `index_shards` config field, one definition for mining, teacher, evaluation and serve."""
    return option(0, SHARDS_HELP)


def shard_cpus_option(default: float = 1.0) -> Any:
    """The `index_shard_cpus` config field that goes with `index_shards`."""
    return option(default, SHARD_CPUS_HELP)



@dataclass
class SearchOptions:
    """Where a step's pool index lives and runs. Mixed into the step configs (`class MineConfig(
    SearchOptions)`) rather than nested, like Tevatron's argument groups, so YAML keys stay flat."""

    index_backend: str = option("auto", "index backend: auto | faiss | torch")
    index_device: str = option("auto", "index device: auto | cpu | cuda")
    index_shards: int = index_shards_option()
    index_shard_cpus: float = shard_cpus_option()


def check_search_options(cfg: SearchOptions) -> None:
    """Refuse shard settings no search can run with (the step's bad-config exit, ConfigError)."""
    if cfg.index_shards < 0 or cfg.index_shard_cpus <= 0:
        raise ConfigError("index_shards must be >= 0 and index_shard_cpus > 0")
