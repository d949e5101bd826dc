"""Launch one training stage on Ray Train: TorchTrainer around `train_loop_per_worker`.

Ray only places and restarts the workers; the loop owns DeepSpeed (see loop.py). Run state lives
under `<run_dir>/ray/<stage>` (RunConfig storage_path + name), so submitting the same stage again
with the same run_dir resumes from its latest checkpoint, and a stage whose `<run>/<stage>/model`
and summary exist is skipped, which makes the whole chain restartable.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from umarvel_ray.config import require_absolute
from umarvel_ray.train.loop import SUMMARY_FILE, train_loop_per_worker
from umarvel_ray.train.stages import TrainConfig, check_start_model

log = logging.getLogger(__name__)


def stage_done(cfg: TrainConfig) -> bool:
    """True when the stage's merged model and its summary are both on disk."""
    return (cfg.model_dir / "config.json").is_file() and (cfg.stage_dir / SUMMARY_FILE).is_file()


def build_trainer(cfg: TrainConfig) -> object:
    """The TorchTrainer for a stage (not started)."""
    return torch_trainer(train_loop_per_worker, cfg, name=cfg.stage)


def torch_trainer(loop: Any, cfg: Any, name: str, extra_config: dict[str, Any] | None = None) -> Any:
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


def run_stage(cfg: TrainConfig, force: bool = False) -> Path:
    """Train one stage with Ray Train (skipped when already done); returns `<run>/<stage>/model`."""
    require_absolute(cfg)
    if stage_done(cfg) and not force:
        log.info("%s already trained: %s (skipping)", cfg.stage, cfg.model_dir)
        return cfg.model_dir
    check_start_model(cfg)
    result = build_trainer(cfg).fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if not stage_done(cfg):
        raise RuntimeError(f"{cfg.stage}: training finished but {cfg.model_dir} was not written")
    log.info("%s: model at %s (checkpoint %s)", cfg.stage, cfg.model_dir, getattr(result, "checkpoint", None))
    return cfg.model_dir
