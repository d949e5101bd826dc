"""What the steps that embed the training queries and the union training pool share (mining hard
negatives, teacher scoring): their input config fields, the first checks of those fields, the start
of a run (checked config saved beside the outputs) and the record a run returns.

A mixin rather than a nested section, so that the YAML keys of both steps stay flat and unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.data import mbeir
from umarvel_ray.embed.config import EmbedConfig

C = TypeVar("C", bound="TrainPoolInputs")
TrainPaths = tuple[Path, Path, Path, Path]  # (data_root, query file, pool file, output dir)
SUMMARY_NAME = "summary.json"  # a run's counts and settings, in its output dir


@dataclass
class TrainPoolInputs:
    """Where a step's training queries, union pool, embeddings and outputs are, and the embedder."""

    data_root: str = field(default="", metadata={"path": "cwd", "help": "M-BEIR root (files and images resolve against it)"})
    model: str = field(
        default="",
        metadata={
            "path": "model",
            "help": "embedder model dir (mining: stage 3, teacher: stage 4); may be empty when both "
            "embedding dirs are complete",
        },
    )
    adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional embedder LoRA adapter directory"})
    output_dir: str = field(
        default="", metadata={"path": "cwd", "help": "where the step's outputs and summary.json go"}
    )
    query_file: str = field(default=mbeir.TRAIN_QUERY_FILE, metadata={"path": "data", "help": "training queries jsonl"})
    pool_file: str = field(default=mbeir.TRAIN_POOL_FILE, metadata={"path": "data", "help": "union training pool jsonl"})
    query_embeddings: str | None = field(
        default=None,
        metadata={
            "path": "cwd",
            "help": "query embedding dir; null = <output_dir>/embeddings/queries-<which queries> (mining: "
            "queries[-firstN], teacher: queries-<sample hash>)",
        },
    )
    pool_embeddings: str | None = field(
        default=None, metadata={"path": "cwd", "help": "pool embedding dir; null = <output_dir>/embeddings/pool"}
    )
    embed: EmbedConfig = field(
        default_factory=EmbedConfig,
        metadata={
            "help": "embedding settings; input/output_dir/kind/model/adapter/data_root are set by the job"
        },
    )


def check_train_pool_inputs(cfg: TrainPoolInputs, model_fields: tuple[str, ...] = ("model",)) -> TrainPaths:
    """The checks every such step makes, after its own: an existing data_root, an output_dir, the
    search options, and existing model directories (`model_fields` of `cfg` that are set).
    Returns (data_root, query file, pool file, output dir); ConfigError names the field."""
    from umarvel_ray.data.tasks import job_train_inputs
    from umarvel_ray.index.options import check_search_options

    if not cfg.data_root or not Path(cfg.data_root).expanduser().is_dir():
        raise ConfigError(f"data_root must be an existing directory, got {cfg.data_root!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required")
    check_search_options(cfg)
    for name in model_fields:
        value = getattr(cfg, name)
        if value and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{name} directory not found: {value}")
    return job_train_inputs(cfg.data_root, cfg.query_file, cfg.pool_file, cfg.output_dir)


def start_run(cfg: C, validate: Callable[[C], TrainPaths]) -> TrainPaths:
    """Refuse relative paths, check the config, then create the output dir and save the resolved config
    there, before any work; returns `validate`'s paths."""
    require_absolute(cfg)
    paths = validate(cfg)
    paths[3].mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths[3])
    return paths


@dataclass
class StepResult:
    """What one run of such a step produced: its output directory, the counts and seconds of its
    SUMMARY line, and the line itself. Each step adds the path of its main output."""

    output_dir: Path
    counts: dict[str, Any]
    seconds: float
    summary: str = ""
