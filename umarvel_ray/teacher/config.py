"""`TeacherConfig` (the settings of `jobs/teacher_scores.py`), its checks and `TeacherResult`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from umarvel_ray.config import ConfigError
from umarvel_ray.data import catalogue
from umarvel_ray.embed.train_pool import StepResult, TrainPoolInputs, check_train_pool_inputs
from umarvel_ray.index.options import SearchOptions

log = logging.getLogger("umarvel_ray.teacher")

DEFAULT_TASK_WEIGHTS = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}


@dataclass
class TeacherConfig(SearchOptions, TrainPoolInputs):
    """Settings of one teacher-scoring job (`jobs/teacher_scores.py --config CFG key=value ...`).

    The inputs (data_root, model, adapter, output_dir, query/pool files and embeddings, embed) come
    from `TrainPoolInputs`, the index settings (index_backend, index_device, index_shards,
    index_shard_cpus) from `SearchOptions`: flat keys like the others. `model` is the stage-4
    embedder; teacher.jsonl and summary.json go to `output_dir`; the default query embedding dir
    is named after the sample (`queries-<sample hash>`).
    """

    reranker: str | None = field(
        default=None, metadata={"path": "model", "help": "re-ranker model dir; null = teacher is cos only"}
    )
    reranker_adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional re-ranker LoRA adapter"})
    reranker_dtype: str | None = field(
        default=None, metadata={"help": "re-ranker dtype override (float32|bfloat16|auto)"}
    )
    fraction: float = field(default=0.1, metadata={"help": "fraction of each task's queries sampled"})
    holdout_fraction: float = field(
        default=0.0,
        metadata={"help": "sample only from the held-out train queries (data/holdout.py), the slice training "
                  "left out; must equal the training stages' holdout_fraction (0 = any query, the paper's choice)"},
    )
    min_per_task: int = field(default=1, metadata={"help": "at least this many queries per task"})
    max_per_task: int | None = field(
        default=None, metadata={"help": "at most this many queries per task (tests, smoke runs)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed (per task: seed, task name)"})
    top_k: int = field(default=50, metadata={"help": "candidates per query from the task's local pool"})
    default_weight: float = field(default=1.0, metadata={"help": "w in cos + w * P(Yes)"})
    task_weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS),
        metadata={"help": "per-task w by task name (mscoco_task0 = MSCOCO t->i, mscoco_task3 = i->t)"},
    )
    shard_queries: int = field(default=1000, metadata={"help": "queries per re-ranker shard (restart unit)"})
    decode_queries: int = field(default=4, metadata={"help": "queries per CPU decode task batch"})
    pairs_per_batch: int = field(default=64, metadata={"help": "pairs per re-ranker actor batch"})
    rerank_batch_size: int = field(default=16, metadata={"help": "pairs per re-ranker forward"})
    num_actors: int = field(default=0, metadata={"help": "re-ranker actors; 0 = one per GPU, or 1 on CPU"})
    actor_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per re-ranker actor"})
    decode_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per decode task"})
    torch_threads: int = field(default=0, metadata={"help": "torch threads per actor; 0 = actor_num_cpus"})
    use_gpu: str = field(default="auto", metadata={"help": "auto (if the cluster has GPUs) | true | false"})
    min_pixels: int | None = field(
        default=None, metadata={"help": "re-ranker image floor; null = its config"}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "re-ranker image budget; null = its config"}
    )
    ray_progress_bars: bool = field(default=False, metadata={"help": "show Ray Data's own progress bars"})


@dataclass(kw_only=True)
class TeacherResult(StepResult):
    """What one `run_teacher_scoring` call produced (and teacher.jsonl's path)."""

    teacher_path: Path


def validate_config(cfg: TeacherConfig) -> tuple[Path, Path, Path, Path]:
    """(data_root, query file, pool file, output dir) after checking the config."""
    if not 0.0 < cfg.fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {cfg.fraction}")
    if not 0.0 <= cfg.holdout_fraction < 0.5:
        raise ConfigError(f"holdout_fraction must be in [0, 0.5), got {cfg.holdout_fraction}")
    if cfg.min_per_task < 0 or (cfg.max_per_task is not None and cfg.max_per_task < 1):
        raise ConfigError("min_per_task must be >= 0 and max_per_task >= 1 (or null)")
    for name in ("top_k", "shard_queries", "decode_queries", "pairs_per_batch", "rerank_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"use_gpu must be auto, true or false, got {cfg.use_gpu!r}")
    known = {t.name for t in catalogue.MBEIR_TASKS}
    unknown = sorted(set(cfg.task_weights) - known)
    if unknown:
        log.warning("task_weights names no M-BEIR evaluation task: %s", unknown)
    return check_train_pool_inputs(cfg, model_fields=("model", "reranker"))
