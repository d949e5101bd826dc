"""`MineConfig` (the settings of `jobs/mine_negatives.py`), its checks and `MineResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from umarvel_ray.config import ConfigError
from umarvel_ray.embed.train_pool import StepResult, TrainPoolInputs, check_train_pool_inputs
from umarvel_ray.index.options import SearchOptions
from umarvel_ray.mine.select import STRATEGIES

POOLS = ("union", "local")  # where negatives come from: the whole train pool or the task's local pool


@dataclass
class MineConfig(SearchOptions, TrainPoolInputs):
    """Settings of one mining job (`jobs/mine_negatives.py --config CFG key=value ...`).

    The inputs (data_root, model, adapter, output_dir, query/pool files and embeddings, embed) come
    from `TrainPoolInputs`, the index settings (index_backend, index_device, index_shards,
    index_shard_cpus) from `SearchOptions`: flat keys like the others. `model` is the stage-3
    embedder; negatives.jsonl and summary.json go to `output_dir`.
    """

    depth: int = field(default=100, metadata={"help": "retrieval depth (top-k searched per query)"})
    num_negatives: int = field(default=5, metadata={"help": "negatives kept per query"})
    strategy: str = field(default="umarvel", metadata={"help": "umarvel | mmembed"})
    pool: str = field(
        default="union",
        metadata={"help": "union (whole mixed-modality train pool) | local (each task's own local pool: "
                  "same dataset, task's candidate modality; the re-ranker's negatives, docs/RECIPE.md s.3)"},
    )
    max_score: float | None = field(
        default=None,
        metadata={"help": "drop candidates scoring above this (0.7 in the ablation); null = off"},
    )
    c2_ranks: list[int] = field(
        default_factory=lambda: [46, 50],
        metadata={"help": "mmembed: 1-based inclusive rank range of right-modality negatives (C2)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the mmembed sampling (per query: seed, qid)"})
    max_queries: int | None = field(
        default=None, metadata={"help": "mine only the first N query lines (tests, smoke runs)"}
    )
    search_batch: int = field(default=4096, metadata={"help": "queries per index search call"})
    index_fp16: bool = field(default=False, metadata={"help": "fp16 index storage (not bit-exact)"})


@dataclass(kw_only=True)
class MineResult(StepResult):
    """What one `run_mining` call produced (and negatives.jsonl's path)."""

    negatives_path: Path


def validate_config(cfg: MineConfig) -> tuple[Path, Path, Path, Path]:
    """(data_root, query file, pool file, output dir) after checking the config."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.pool not in POOLS or (cfg.pool == "local" and cfg.strategy != "umarvel"):
        raise ConfigError(f"pool must be one of {POOLS} (local with strategy=umarvel), got {cfg.pool!r}")
    if cfg.depth < 1 or cfg.num_negatives < 1 or cfg.search_batch < 1:
        raise ConfigError("depth, num_negatives and search_batch must be >= 1")
    if cfg.max_queries is not None and cfg.max_queries < 1:
        raise ConfigError(f"max_queries must be >= 1 or null, got {cfg.max_queries}")
    if len(cfg.c2_ranks) != 2 or not 1 <= cfg.c2_ranks[0] <= cfg.c2_ranks[1]:
        raise ConfigError(f"c2_ranks must be [lo, hi] with 1 <= lo <= hi, got {cfg.c2_ranks}")
    if cfg.strategy == "mmembed" and cfg.depth < cfg.c2_ranks[1]:
        raise ConfigError(f"mmembed needs depth >= {cfg.c2_ranks[1]} (c2_ranks), got {cfg.depth}")
    return check_train_pool_inputs(cfg)
