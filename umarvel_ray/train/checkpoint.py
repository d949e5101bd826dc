"""Checkpoints and the run's records: save / read / prune, the step to resume from, the report to
Ray Train, rank 0's per-step log and the final merged model with its summary.

The contract (exact):
* Every `save_every` steps (and after the last step) every rank calls `engine.save_checkpoint` into
  a directory with tag `global_step<N>` (its ZeRO shard; frozen base weights are excluded), and
  rank 0 writes `<tag>/train_state.json` = {global_step: N, epoch, step_in_epoch, samples, ...}.
  Under Ray that directory is a per-rank temp dir passed to `ray.train.report(checkpoint=...)`, and
  Ray merges all ranks' files into one checkpoint in storage; without Ray it is
  `<stage_dir>/checkpoints/` (shared storage when multi-node), oldest beyond `keep_checkpoints`
  removed.
* On start the loop restores from `ray.train.get_checkpoint()` (Ray restarts after a failure, or a
  resubmission under the same run name) or from `resume_from` / the latest local checkpoint, then
  continues with global step N+1: the data plan (see batches.py) makes that the first batch after
  the checkpointed step on every rank. Steps done after the last checkpoint and before a crash are
  trained again (their batches are replayed; steps.jsonl then lists them twice). The LR schedule,
  optimizer moments and the task's own trained state (e.g. tau) come back from the checkpoint;
  dropout is reseeded per (seed, rank, step).
* After the last step rank 0 merges the LoRA and writes `<stage_dir>/model` (plain HF dir) plus
  `train_config.yaml`, then `<stage_dir>/train_summary.json`, which marks the run as done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from umarvel_ray.config import save_config, to_dict
from umarvel_ray.layout import CHECKPOINTS_DIR, TRAIN_SUMMARY_FILE
from umarvel_ray.train.config import LoraRunConfig

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


def ray_train_active() -> bool:
    """True inside a Ray Train worker (`ray.train.get_context()` raises elsewhere)."""
    try:
        import ray.train

        ray.train.get_context()
        return True
    except (ImportError, RuntimeError):
        return False


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None = None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def _latest_local(ckpt_root: Path) -> Path | None:
    return ckpt_root if (ckpt_root / "latest").is_file() else None


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    """train_state.json of the checkpoint `latest` points to."""
    tag = (ckpt_dir / "latest").read_text().strip()
    return json.loads((ckpt_dir / tag / STATE_FILE).read_text())


def save_checkpoint(engine: Any, root: Path, state: dict[str, Any], rank: int) -> str:
    """Every rank writes its shard; rank 0 adds train_state.json. Returns the tag."""
    tag = f"global_step{state['global_step']}"
    engine.save_checkpoint(
        str(root), tag=tag, client_state={"train_state": state}, exclude_frozen_parameters=True
    )
    if rank == 0:
        (root / tag / STATE_FILE).write_text(json.dumps(state, indent=2))
    return tag


def _prune(root: Path, keep: int) -> None:
    tags = sorted((p for p in root.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name[11:]))
    for p in tags[: max(0, len(tags) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def resume_step(engine: Any, cfg: LoraRunConfig, under_ray: bool, world: int, rank: int, label: str) -> int:
    """Load the latest checkpoint into `engine` (Ray Train's, else cfg.resume_from); the global
    step to continue from (0 for a fresh run). Refuses a different world size or batch size,
    which would change the data order."""
    with _resume_dir(cfg, under_ray) as rdir:
        if rdir is None or not (rdir / "latest").is_file():
            return 0
        _, client = engine.load_checkpoint(str(rdir), load_module_strict=False)
        state = (client or {}).get("train_state") or read_state(rdir)
        if (state["world_size"], state["per_device_batch"]) != (world, cfg.per_device_batch):
            raise RuntimeError(
                f"checkpoint was written with {state['world_size']} workers x {state['per_device_batch']} "
                f"per device; resuming with {world} x {cfg.per_device_batch} would change the data order"
            )
        start = int(state["global_step"])
        if rank == 0:
            log.info("resumed %s from %s at global step %d", label, rdir, start)
        return start


def checkpoint_or_report(
    engine: Any,
    cfg: LoraRunConfig,
    step: int,
    total: int,
    state: dict[str, Any],
    metrics: dict[str, Any] | None,
    rank: int,
    under_ray: bool,
    ckpt_root: Path,
) -> None:
    """Every `save_every` steps and at the end: each rank's DeepSpeed shard, reported to Ray Train
    (or kept under `ckpt_root`, pruned to `keep_checkpoints`); otherwise just report the metrics."""
    import torch.distributed as dist

    if step % cfg.save_every == 0 or step == total:
        if under_ray:
            with tempfile.TemporaryDirectory(prefix="umarvel_ckpt_") as tmp:
                save_checkpoint(engine, Path(tmp), state, rank)
                _report({**(metrics or {"step": step}), **state}, Path(tmp), name=f"step_{step:08d}")
        else:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            save_checkpoint(engine, ckpt_root, state, rank)
            dist.barrier()
            if rank == 0:
                _prune(ckpt_root, cfg.keep_checkpoints)
    elif metrics and under_ray:
        _report(metrics, None)


@contextlib.contextmanager
def _resume_dir(cfg: LoraRunConfig, under_ray: bool) -> Iterator[Path | None]:
    if under_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                yield Path(d)
            return
    if cfg.resume_from:
        yield Path(cfg.resume_from)
        return
    yield None if under_ray else _latest_local(cfg.stage_dir / CHECKPOINTS_DIR)


class StepLog:
    """Rank 0's append-only per-step record (global step, data position, loss): resume audit trail."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def save_merged(
    cfg: LoraRunConfig,
    engine: Any,
    rank: int,
    name: str,
    merge: Callable[[Path], dict[str, Any]],
    total: int,
    start: int,
    last: dict[str, Any],
    seconds: float,
) -> None:
    """Gather ZeRO-3 shards, then rank 0 writes the merged model, resolved config and summary.

    `merge(out_dir)` saves the merged model and returns extra summary fields.
    """
    import torch.distributed as dist

    gather = contextlib.nullcontext()
    if cfg.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with gather:
        if rank == 0:
            out = cfg.model_dir
            if out.exists():
                shutil.rmtree(out)
            extra = merge(out)
            save_config(cfg, out, name="train_config.yaml")
            save_config(cfg, cfg.stage_dir)
            summary = {
                "stage": name,
                "model_dir": str(out),
                "total_steps": total,
                "resumed_at": start,
                "seconds": seconds,
                **extra,
                "last": last,
                "config": to_dict(cfg),
            }
            (cfg.stage_dir / TRAIN_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            log.info("%s done: model at %s", name, out)
    dist.barrier()

