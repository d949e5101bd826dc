"""The one per-worker training loop: `run_worker(task, cfg)`, with or without Ray Train.

Every training run here (the embedder's five stages, the re-ranker's SFT) is the same loop over a
different *task*: the loop owns what they share, the task supplies only what differs.

* The loop: the process group, the DeepSpeed engine, resume, the global step counter, the
  per-step dropout seed and train state, the metric window and its log line, the step log,
  checkpoints (and reports to Ray Train), a testing failure, the final merge and summary.
* The task (`TrainTask`): build the module DeepSpeed wraps, read the examples, yield this rank's
  batches from a global step on, run one step (engine, batch) -> `StepResult`, add its own
  metrics at log steps, word its log lines, and save the merged model.

It runs on every Ray Train worker (`TorchTrainer`), in a plain `python` process (world size 1), or
under `torchrun`: Ray only launches it. Under Ray the process group already exists (TorchConfig);
otherwise DeepSpeed creates it from the usual env variables (defaults to a single local rank on
127.0.0.1), and the loop destroys it again when the run ends. The checkpoint / resume contract is
in checkpoint.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from umarvel_ray.layout import CHECKPOINTS_DIR, STEPS_FILE
from umarvel_ray.model.losses import stable_id
from umarvel_ray.progress import quiet_known_noise
from umarvel_ray.train.batches import ShardPlan
from umarvel_ray.train.checkpoint import (
    StepLog,
    checkpoint_or_report,
    ray_train_active,
    resume_step,
    save_merged,
)
from umarvel_ray.train.config import LoraRunConfig
from umarvel_ray.train.engine import deepspeed_config, import_deepspeed, init_distributed, init_engine

log = logging.getLogger(__name__)

FAILURE_MARKER = ".injected_failure"


class Placement(NamedTuple):
    """Where this worker runs: data-parallel world size, its rank, and whether it trains on a GPU."""

    world: int
    rank: int
    use_gpu: bool


@dataclass
class StepResult:
    """One optimizer step as the task reports it: loss and accuracy (means over all ranks), the
    examples every rank trained on together (the metric window's samples/s), and task-specific
    fields written after the loss in the step log and at the end of the logged metrics."""

    loss: float
    accuracy: float
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


class TrainTask(Protocol):
    """What differs between training runs; `run_worker` calls these in this order.

    A batch (whatever `batches` yields) has `epoch`, `step` (within the epoch), `indices` and
    `dropped` (examples left out for undecodable images): the step log records them.
    """

    def build_module(self, where: Placement) -> tuple[nn.Module, bool]:
        """The module DeepSpeed wraps (its LoRA freshly initialised) and whether it trains in bf16."""
        ...

    def build_data(self) -> int:
        """Read the training examples; their number (the data plan shards them)."""
        ...

    def describe(self, plan: ShardPlan, total: int, start: int) -> str:
        """Rank 0's start line: the data, the scale, the steps."""
        ...

    def batches(self, plan: ShardPlan, start: int, total: int) -> Iterator[Any]:
        """This rank's batches for global steps [start, total)."""
        ...

    def step(self, engine: Any, batch: Any) -> StepResult:
        """Forward, backward and one `engine.step()`."""
        ...

    def log_metrics(self) -> dict[str, Any]:
        """Extra metrics at a log step (after accuracy); called on every rank (may be collective)."""
        ...

    def step_message(self, metrics: dict[str, Any], total: int) -> str:
        """Rank 0's log line for a log step."""
        ...

    def merge(self, engine: Any, out: Path) -> dict[str, Any]:
        """Rank 0 saves the merged model to `out`; extra summary fields."""
        ...


@dataclass
class _Run:
    """The state a run carries from set-up through its steps to the merge."""

    engine: Any
    plan: ShardPlan
    total: int
    start: int
    where: Placement
    under_ray: bool
    t_start: float
    last: dict[str, Any] = field(default_factory=dict)


class _Window:
    """Samples trained since the last logged step, for the samples/s of the next log line."""

    def __init__(self) -> None:
        self.t, self.samples = time.time(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        """Samples per second since the last call (or the start), then start a new window."""
        rate = self.samples / max(time.time() - self.t, 1e-9)
        self.t, self.samples = time.time(), 0
        return rate


def run_worker(task: TrainTask, cfg: LoraRunConfig) -> None:
    """Train `task` on this rank (see the module docstring); a process group this call created is
    destroyed when the run has finished."""
    import torch.distributed as dist

    quiet_known_noise()
    under_ray = ray_train_active()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    own_group = not dist.is_initialized()
    world, rank, _ = init_distributed(use_gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = _set_up(task, cfg, Placement(world, rank, use_gpu), under_ray)
    _train(task, cfg, run)
    save_merged(
        cfg,
        run.engine,
        rank,
        cfg.stage,
        lambda out: task.merge(run.engine, out),
        run.total,
        run.start,
        run.last,
        time.time() - run.t_start,
    )
    if own_group and dist.is_initialized():
        dist.destroy_process_group()


def _set_up(task: TrainTask, cfg: LoraRunConfig, where: Placement, under_ray: bool) -> _Run:
    """Module, data plan, DeepSpeed engine, and the step to continue from (a checkpoint's or 0)."""
    ds = import_deepspeed()
    t_start = time.time()
    torch.manual_seed(cfg.seed)  # the fresh LoRA's init: same seed, same run (any ZeRO stage)
    module, bf16 = task.build_module(where)
    plan = ShardPlan(task.build_data(), where.world, where.rank, cfg.per_device_batch, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    engine = init_engine(ds, module, deepspeed_config(cfg, bf16=bf16), cfg, total)
    start = resume_step(engine, cfg, under_ray, where.world, where.rank, cfg.stage)
    return _Run(engine, plan, total, start, where, under_ray, t_start)


def _train(task: TrainTask, cfg: LoraRunConfig, run: _Run) -> None:
    """Global steps run.start+1 .. run.total: step, log, checkpoint (see checkpoint.py)."""
    rank = run.where.rank
    steps_log = StepLog(cfg.stage_dir / STEPS_FILE, rank == 0)
    ckpt_root = cfg.stage_dir / CHECKPOINTS_DIR
    if rank == 0:
        log.info("%s", task.describe(run.plan, run.total, run.start))
    window = _Window()
    g = run.start
    for batch in task.batches(run.plan, run.start, run.total):
        torch.manual_seed(stable_id(f"{cfg.seed}|{rank}|{g}") & 0x7FFF_FFFF)
        lr = float(run.engine.get_lr()[0])  # the rate this step uses
        res = task.step(run.engine, batch)
        g += 1
        window.add(res.samples)
        steps_log.write(
            {
                "step": g,
                "epoch": batch.epoch,
                "batch": batch.step,
                "indices": batch.indices,
                "loss": res.loss,
                **res.extra,
                "dropped": batch.dropped,
            }
        )
        metrics: dict[str, Any] = {}
        if g % cfg.log_every == 0 or g == run.total:
            metrics = {
                "step": g,
                "epoch": batch.epoch,
                "loss": res.loss,
                "accuracy": res.accuracy,
                **task.log_metrics(),
                "lr": lr,
                "samples_per_s": window.rate(),
                **res.extra,
            }
            run.last = metrics
            if rank == 0:
                log.info("%s", task.step_message(metrics, run.total))
        state = _train_state(cfg, run, g, batch)
        checkpoint_or_report(run.engine, cfg, g, run.total, state, metrics, rank, run.under_ray, ckpt_root)
        _inject_failure(cfg, g, rank)


def _train_state(cfg: LoraRunConfig, run: _Run, g: int, batch: Any) -> dict[str, Any]:
    """What a checkpoint records about the data position (resume refuses another world x batch)."""
    return {
        "global_step": g,
        "epoch": batch.epoch,
        "step_in_epoch": batch.step + 1,
        "samples": g * run.plan.global_batch,
        "total_steps": run.total,
        "world_size": run.where.world,
        "per_device_batch": cfg.per_device_batch,
        "seed": cfg.seed,
        "stage": cfg.stage,
    }


def _inject_failure(cfg: LoraRunConfig, g: int, rank: int) -> None:
    """Testing: rank 0 raises once after step `cfg.failure_step` (a marker file makes it once)."""
    if cfg.failure_step and g == cfg.failure_step and rank == 0:
        marker = cfg.stage_dir / FAILURE_MARKER
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"injected failure after step {g}\n")
            raise RuntimeError(f"injected failure after step {g} (inject_failure_at_step)")
