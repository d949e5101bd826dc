"""The evaluation's reranking settings (`RerankOptions`, mixed into `EvalConfig`) and their checks.

    rerank=none       the first-stage ranking is the result (default)
    rerank=umarvel+   U-MARVEL+ (docs/RECIPE.md section 3): each query's top-`rerank_top_k` (paper
                      50) reordered by cos + w * P(Yes) of a TRAINED re-ranker (`rerank_model`
                      with umarvel_reranker.json, or `rerank_adapter`); w = `rerank_weight` (paper
                      0.1) or the task's entry in `rerank_task_weights`
    rerank=zeroshot   MM-Embed's zero-shot reranking (docs/RECIPE.md section 4): an UNTRAINED base
                      MLLM (`rerank_model` without umarvel_reranker.json, no adapter) asked its
                      "True or False" question (`RerankerConfig.judge=true_false`); the top-K are
                      reordered by P(True) alone (ties: cos, then id)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, check_model_dir, option
from umarvel_ray.data.catalogue import MBEIR_TASKS
from umarvel_ray.model.saved import RERANKER_META_FILE
from umarvel_ray.rerank.config import PairPoolConfig, RerankModel, check_pair_pool

log = logging.getLogger("umarvel_ray.eval")

RERANK_MODES = ("none", "umarvel+", "zeroshot")


@dataclass
class RerankOptions:
    """Reranking of each query's first-stage top-K at evaluation (see the module doc)."""

    rerank: str = option("none", "none | umarvel+ (cos + w * P(Yes), trained re-ranker) | zeroshot (P(True), base MLLM)")
    rerank_model: str | None = option(
        None, "re-ranker dir: <run_dir>/reranker/model for umarvel+, the base model for zeroshot", path="model"
    )
    rerank_adapter: str | None = option(None, "optional re-ranker LoRA adapter (umarvel+ only)", path="cwd")
    rerank_dtype: str | None = option(None, "re-ranker dtype override (float32|bfloat16|auto)")
    rerank_top_k: int = option(50, "candidates reranked per query and pool (paper 50); >= the search depth")
    rerank_weight: float = option(0.1, "U-MARVEL+ w in cos + w * P(Yes) (paper 0.1)")
    rerank_task_weights: dict[str, float] = option({}, "per-task w by task name, e.g. {mscoco_task0: 0.5}")
    rerank_batch_size: int = option(16, "pairs per re-ranker forward pass")
    rerank_pool: PairPoolConfig = field(
        default_factory=PairPoolConfig,
        metadata={"help": "decode tasks and re-ranker actor pool (num_actors, use_gpu, pairs_per_batch, ...)"},
    )


def _has_meta(path: str | None) -> bool:
    return bool(path) and (Path(str(path)).expanduser() / RERANKER_META_FILE).is_file()


def check_rerank_options(cfg: RerankOptions) -> None:
    """ConfigError naming the key of a reranking setting that cannot work (before anything runs)."""
    if cfg.rerank not in RERANK_MODES:
        raise ConfigError(f"rerank must be one of {RERANK_MODES}, got {cfg.rerank!r}")
    if cfg.rerank == "none":
        return
    if not cfg.rerank_model:
        raise ConfigError(f"rerank={cfg.rerank} needs rerank_model=<re-ranker model directory>")
    check_model_dir(cfg.rerank_model, "rerank_model")
    for name in ("rerank_top_k", "rerank_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    check_pair_pool(cfg.rerank_pool, "rerank_pool.")
    if cfg.rerank == "zeroshot":
        if cfg.rerank_adapter or _has_meta(cfg.rerank_model):
            raise ConfigError(
                "rerank=zeroshot scores with an untrained base MLLM: rerank_model must be the base model "
                f"(no {RERANKER_META_FILE}) and rerank_adapter null; got rerank_model={cfg.rerank_model}, "
                f"rerank_adapter={cfg.rerank_adapter}"
            )
    elif not (_has_meta(cfg.rerank_model) or cfg.rerank_adapter):
        raise ConfigError(
            f"rerank=umarvel+ needs a trained re-ranker: rerank_model={cfg.rerank_model} has no "
            f"{RERANKER_META_FILE} and no rerank_adapter is given (train one with jobs/train_reranker.py)"
        )
    unknown = sorted(set(cfg.rerank_task_weights) - {t.name for t in MBEIR_TASKS})
    if unknown:
        log.warning("rerank_task_weights names no M-BEIR evaluation task: %s", unknown)


def check_rerank_depth(cfg: RerankOptions, depth: int) -> None:
    """Every reported R@k must be over the reranked list: rerank_top_k >= the search depth."""
    if cfg.rerank != "none" and cfg.rerank_top_k < depth:
        raise ConfigError(
            f"rerank_top_k={cfg.rerank_top_k} is below the search depth {depth} (max of k and the tasks' "
            "R@k): set rerank_top_k >= that depth"
        )


def rerank_model(cfg: RerankOptions) -> RerankModel:
    """The re-ranker the actors load: zeroshot forces the True/False judge on the base model."""
    overrides: dict[str, Any] = {"dtype": cfg.rerank_dtype} if cfg.rerank_dtype else {}
    if cfg.rerank == "zeroshot":
        overrides["judge"] = "true_false"
    return RerankModel(str(cfg.rerank_model), cfg.rerank_adapter, overrides or None, cfg.rerank_batch_size)


def rerank_label(cfg: RerankOptions) -> str:
    """One line naming the reranker, K and w (the reranked table's title)."""
    if cfg.rerank == "zeroshot":
        return f"Reranked: zeroshot (MM-Embed), score = P(True) of {cfg.rerank_model}, top-{cfg.rerank_top_k}"
    per_task = "".join(f", {t}: {w}" for t, w in sorted(cfg.rerank_task_weights.items()))
    return (
        f"Reranked: umarvel+ (U-MARVEL+), score = cos + w * P(Yes) of {cfg.rerank_model}, "
        f"top-{cfg.rerank_top_k}, w = {cfg.rerank_weight}{per_task}"
    )


def rerank_settings(cfg: RerankOptions) -> dict[str, Any]:
    """What the report records of the reranking."""
    return {
        "mode": cfg.rerank,
        "model": cfg.rerank_model,
        "adapter": cfg.rerank_adapter,
        "top_k": cfg.rerank_top_k,
        "score": "P(True)" if cfg.rerank == "zeroshot" else "cos + w * P(Yes)",
        "weight": None if cfg.rerank == "zeroshot" else cfg.rerank_weight,
        "task_weights": None if cfg.rerank == "zeroshot" else dict(cfg.rerank_task_weights),
    }


__all__ = [
    "RERANK_MODES",
    "RerankOptions",
    "check_rerank_depth",
    "check_rerank_options",
    "rerank_label",
    "rerank_model",
    "rerank_settings",
]
