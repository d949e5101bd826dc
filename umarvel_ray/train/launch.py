"""Launch a training run on Ray Train: a TorchTrainer around a per-worker loop (worker.py).

Ray only places and restarts the workers; the loop owns DeepSpeed. Run state lives under
`<run_dir>/ray/<stage>` (RunConfig storage_path + name), so submitting the same run again with the
same run_dir resumes from its latest checkpoint, and a run whose merged model (and, for a stage,
its summary) exists is skipped, which makes the whole chain restartable.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from umarvel_ray.config import require_absolute
from umarvel_ray.layout import TRAIN_SUMMARY_FILE
from umarvel_ray.train import embedder, reranker
from umarvel_ray.train.config import LoraRunConfig, TrainConfig, check_start_model
from umarvel_ray.train.reranker import RerankerTrainConfig, check_reranker_inputs

log = logging.getLogger(__name__)


def torch_trainer(loop: Any, cfg: LoraRunConfig, name: str, extra_config: dict[str, Any] | None = None) -> Any:
    """A TorchTrainer (gloo on CPU, NCCL on GPU) running `loop` on `cfg.workers` workers, its run
    state under `<run_dir>/ray/<name>`; `extra_config` is merged on top. The config's paths are
    absolute already (`require_absolute` at the entry points), so workers that do not share the
    driver's working directory read the same files."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    storage = Path(cfg.run_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    config.update(extra_config or {})
    return TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.keep_checkpoints)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def run_trainer(
    loop: Any,
    cfg: LoraRunConfig,
    done: Callable[[], bool],
    check: Callable[[], None],
    force: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Any:
    """Run `loop` on Ray Train unless `done()` (or `force`); `check()` refuses missing inputs first.

    Returns Ray's Result, or None when skipped. Raises the run's error, or RuntimeError when it
    finished without writing `cfg.model_dir`.
    """
    require_absolute(cfg)
    if done() and not force:
        log.info("%s already trained: %s (skipping)", cfg.stage, cfg.model_dir)
        return None
    check()
    result = torch_trainer(loop, cfg, name=cfg.stage, extra_config=extra_config).fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if not done():
        raise RuntimeError(f"{cfg.stage}: training finished but {cfg.model_dir} was not written")
    return result


def stage_done(cfg: TrainConfig) -> bool:
    """True when the stage's merged model and its summary are both on disk."""
    return (cfg.model_dir / "config.json").is_file() and (cfg.stage_dir / TRAIN_SUMMARY_FILE).is_file()


def run_stage(cfg: TrainConfig, force: bool = False) -> Path:
    """Train one stage with Ray Train (skipped when already done); returns `<run>/<stage>/model`.

    A distillation stage whose teacher does not beat cos (train/gate.py) is finished without
    training: its model is its starting model, and the log and train_summary.json say why.
    """
    from umarvel_ray.train.gate import gate_reason, skip_stage

    if not (stage_done(cfg) and not force):
        check_start_model(cfg)
        reason = gate_reason(cfg)
        if reason is not None:
            return skip_stage(cfg, reason)
    loop = embedder.train_loop_per_worker
    result = run_trainer(loop, cfg, lambda: stage_done(cfg), lambda: check_start_model(cfg), force)
    if result is not None:
        log.info("%s: model at %s (checkpoint %s)", cfg.stage, cfg.model_dir, getattr(result, "checkpoint", None))
    return cfg.model_dir


def reranker_done(cfg: RerankerTrainConfig) -> bool:
    """True when `<output>/model` holds a saved model."""
    return (cfg.model_dir / "config.json").is_file()


def run_reranker_training(cfg: RerankerTrainConfig, force: bool = False) -> Path:
    """Train the re-ranker with Ray Train (skipped when `<output>/model` exists); returns that dir."""
    extra = {
        "output": str(cfg.stage_dir.resolve()),
        "negatives_file": str(cfg.negatives_path().resolve()),
    }
    loop = reranker.train_loop_per_worker
    if run_trainer(loop, cfg, lambda: reranker_done(cfg), lambda: check_reranker_inputs(cfg), force, extra):
        log.info("reranker: model at %s", cfg.model_dir)
    return cfg.model_dir
