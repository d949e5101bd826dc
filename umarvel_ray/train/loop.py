"""The per-worker training loop: one DeepSpeed engine per rank, with or without Ray Train.

`train_loop_per_worker(config)` is what Ray Train's TorchTrainer runs on every worker, and what a
plain `python` process (world size 1) or `torchrun` runs directly: Ray only launches it. Under Ray
the process group already exists (TorchConfig); otherwise DeepSpeed creates it from the usual env
variables (defaults to a single local rank on 127.0.0.1).

Checkpoint / resume contract (exact):
* Every `save_every` steps (and after the last step) every rank calls `engine.save_checkpoint` into
  a directory with tag `global_step<N>` (its ZeRO shard; frozen base weights are excluded), and
  rank 0 writes `<tag>/train_state.json` = {global_step: N, epoch, step_in_epoch, samples, ...}.
  Under Ray that directory is a per-rank temp dir passed to `ray.train.report(checkpoint=...)`, and
  Ray merges all ranks' files into one checkpoint in storage; without Ray it is
  `<run>/<stage>/checkpoints/` (shared storage when multi-node), oldest beyond `keep_checkpoints`
  removed.
* On start the loop restores from `ray.train.get_checkpoint()` (Ray restarts after a failure, or a
  resubmission under the same run name) or from `resume_from` / the latest local checkpoint, then
  continues with global step N+1: the data plan (see data.py) makes that the first batch after the
  checkpointed step on every rank. Steps done after the last checkpoint and before a crash are
  trained again (their batches are replayed; steps.jsonl then lists them twice). The LR schedule,
  optimizer moments and tau come back from the checkpoint; dropout is reseeded per (seed, rank, step).
* After the last step rank 0 merges the LoRA and writes `<run>/<stage>/model` (plain HF dir) plus
  `train_config.yaml`, then `<run>/<stage>/train_summary.json`, which marks the stage as done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.config import from_dict, save_config, to_dict
from umarvel_ray.model.losses import LossOutput, cached_backward, dist_world, info_nce, kl_distill, stable_id
from umarvel_ray.progress import quiet_known_noise
from umarvel_ray.train.stages import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
STEPS_FILE = "steps.jsonl"
SUMMARY_FILE = "train_summary.json"
FAILURE_MARKER = ".injected_failure"


# ----------------------------------------------------------------------------------------------
# DeepSpeed plumbing
# ----------------------------------------------------------------------------------------------


def import_deepspeed() -> Any:
    """DeepSpeed, imported lazily (training-only dependency) with CPU-only JIT builds avoided."""
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError("training needs DeepSpeed: pip install 'deepspeed==0.19.8' (see pyproject)") from e
    if not torch.cuda.is_available():
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (~40 s) at init; gloo does
        # the job on CPU. `import deepspeed.comm.torch` binds torch itself (name shadowing), so the
        # module is reached through sys.modules.
        import deepspeed.comm  # noqa: F401

        mod = sys.modules.get("deepspeed.comm.torch")
        if mod is not None and hasattr(mod, "build_shm_op"):
            mod.build_shm_op = lambda: None
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(use_gpu: bool) -> tuple[int, int, int]:
    """Process group via DeepSpeed (reusing Ray's/torchrun's); returns (world, rank, local_rank)."""
    ds = import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    ds.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
    world, rank = dist_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > local_rank else 0)
    return world, rank, local_rank


def zero_template(stage: int) -> dict[str, Any]:
    """The built-in DeepSpeed config (== cluster/deepspeed/zero<stage>.json); "auto" is filled in."""
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            reduce_bucket_size=500_000_000,
            allgather_bucket_size=500_000_000,
        )
    if stage == 3:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            reduce_bucket_size=500_000_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto",
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": "auto",
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": "auto",
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """The stage's DeepSpeed config: a template (file or built-in) with "auto" values filled.

    Gradient accumulation stays 1: GradCache calls backward once per micro-batch and marks the
    accumulation boundary itself, so the global batch is always workers x per_device_batch.
    """
    base = (
        json.loads(Path(cfg.deepspeed_config).read_text())
        if cfg.deepspeed_config
        else zero_template(cfg.zero_stage)
    )
    auto = {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch,
        "gradient_clipping": cfg.grad_clip,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "enabled": bf16,
    }

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if v == "auto":
                    if k not in auto:
                        raise ValueError(f"DeepSpeed config: no value to fill for 'auto' key {k!r}")
                    out[k] = auto[k]
                else:
                    out[k] = fill(v)
            return out
        return node

    return fill(base)


def lr_lambda(total_steps: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine to min_ratio; s = 0-based step."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        span = max(1, total_steps - warmup)
        progress = min(1.0, (s - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class TrainModule(nn.Module):
    """What DeepSpeed wraps: forward(batch) -> (embeddings, scalar tau).

    Returning tau from forward keeps it inside the engine's forward, so ZeRO-3 gathers log_tau
    like any other parameter (registered as an external parameter of this module). A 0-dim log_tau
    is stored as shape (1,) while training: DeepSpeed's initial parameter broadcast views every
    parameter as bytes, which fails for 0-dim tensors; `restore_scalar_tau` undoes it before saving.
    """

    def __init__(self, embedder: nn.Module, zero_stage: int = 0) -> None:
        super().__init__()
        lt = embedder.log_tau
        if lt.dim() == 0:
            embedder.log_tau = nn.Parameter(lt.detach().reshape(1).clone(), requires_grad=lt.requires_grad)
        self.embedder = embedder
        if zero_stage == 3:
            # `deepspeed.zero` is an attribute of the package (deepspeed/__init__.py:
            # `from .runtime import zero`), not an importable module, so `from deepspeed.zero
            # import ...` fails; the documented `deepspeed.zero.register_external_parameter` works.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, embedder.log_tau)

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(batch), self.embedder.tau.reshape(())

    def restore_scalar_tau(self) -> None:
        lt = self.embedder.log_tau
        self.embedder.log_tau = nn.Parameter(lt.detach().float().reshape(()).clone(), requires_grad=False)


def current_tau(embedder: Any, zero_stage: int) -> float:
    """The temperature now; under ZeRO-3 log_tau is a partition outside forward, so every rank
    gathers it (a collective: call on all ranks)."""
    if zero_stage != 3:
        return float(embedder.tau.detach().float().reshape(()))
    import deepspeed

    with deepspeed.zero.GatheredParameters([embedder.log_tau]):
        return float(embedder.tau.detach().float().reshape(()))


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def make_loss_fn(
    cfg: TrainConfig, batch: Any
) -> Callable[[dict[str, torch.Tensor], torch.Tensor | None], LossOutput]:
    """The stage objective over the (full, local) embeddings of one batch; gathers inside."""

    def to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.to(like.device)

    if cfg.objective == "distill":

        def distill(e: dict[str, torch.Tensor], tau: torch.Tensor | None) -> LossOutput:
            q = e["query"]
            return kl_distill(
                q,
                e["candidates"],
                to(batch.scores, q),
                tau if tau is not None else cfg.tau_init,
                mask=to(batch.cand_mask, q),
            )

        return distill

    def contrastive(e: dict[str, torch.Tensor], tau: torch.Tensor | None) -> LossOutput:
        q = e["query"]
        ids = {}
        if cfg.mask_false_negatives:
            ids = dict(
                pos_ids=to(batch.pos_ids, q), neg_ids=to(batch.neg_ids, q), query_ids=to(batch.query_ids, q)
            )
        return info_nce(
            q,
            e["positive"],
            e.get("negatives"),
            tau if tau is not None else cfg.tau_init,
            symmetric=cfg.objective == "symmetric",
            **ids,
        )

    return contrastive


def _dense_grad_norm(engine: Any) -> float:
    """Norm of the (already reduced) gradients; ZeRO 0 in fp32 keeps no norm of its own."""
    sq = [
        float(p.grad.detach().float().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None
    ]
    return math.sqrt(sum(sq))


def train_step(engine: Any, batch: Any, loss_fn: Callable[..., LossOutput]) -> tuple[LossOutput, float]:
    """Forward, backward and optimizer step for one batch; returns (loss, pre-clip global grad norm).

    `batch.chunks` maps role -> micro-batches. One chunk per role: plain forward + `engine.backward`.
    Several: GradCache, one backward per chunk with the accumulation boundary set on the last one.
    Either way exactly one `engine.step()`.
    """
    n_chunks = {len(v) for v in batch.chunks.values()}
    if n_chunks == {1}:
        embs, tau = {}, None
        for role, chunks in batch.chunks.items():
            embs[role], tau = engine(chunks[0])
        out = loss_fn(embs, tau)
        engine.backward(out.backward_loss)
        out = out.detached()
    else:
        (k_total,) = n_chunks
        calls = [0]

        def backward(surrogate: torch.Tensor) -> None:
            calls[0] += 1
            engine.set_gradient_accumulation_boundary(calls[0] == k_total)
            engine.backward(surrogate, scale_wrt_gas=False)

        out = cached_backward(engine, batch.chunks, loss_fn, backward)
        if calls[0] != k_total:
            raise RuntimeError(f"GradCache made {calls[0]} backward calls for {k_total} chunks")
    dense = _dense_grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    norm = engine.get_global_grad_norm()
    return out, float(norm if norm is not None else dense if dense is not None else float("nan"))


# ----------------------------------------------------------------------------------------------
# Ray helpers (all optional)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _embedder_config(cfg: TrainConfig, use_gpu: bool) -> Any:
    """EmbedderConfig: the input model's saved config (if any) < this stage's settings."""
    from umarvel_ray.config import deep_update
    from umarvel_ray.model.embedder import EmbedderConfig
    from umarvel_ray.model.saved import EMBEDDER_META_FILE, read_saved_meta

    data = to_dict(EmbedderConfig())
    meta = read_saved_meta(EMBEDDER_META_FILE, cfg.model)
    if meta.get("config"):
        deep_update(data, meta["config"], str(Path(cfg.model) / EMBEDDER_META_FILE))
    tau = float(meta["tau"]) if cfg.inherit_tau and "tau" in meta else cfg.tau_init
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    data.update(
        model=cfg.model,
        tau_init=tau,
        learn_tau=cfg.learn_tau,
        gradient_checkpointing=cfg.gradient_checkpointing,
        dtype=dtype,
        lora={"enabled": True, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
    )
    deep_update(data, dict(cfg.embedder), "embedder")
    return from_dict(EmbedderConfig, data)


def init_engine(ds: Any, module: nn.Module, ds_config: dict[str, Any], cfg: Any, total: int) -> Any:
    """The DeepSpeed engine over `module`'s trainable parameters; warmup + cosine LR through torch
    unless the DeepSpeed config brings its own scheduler."""
    sched = (
        None
        if "scheduler" in ds_config
        else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(total, cfg.warmup_ratio, cfg.min_lr_ratio)
            )
        )
    )
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = ds.initialize(
        model=module, model_parameters=params, config=ds_config, lr_scheduler=sched
    )
    return engine


def resume_step(engine: Any, cfg: Any, under_ray: bool, world: int, rank: int, label: str) -> int:
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
    cfg: Any,
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
def _resume_dir(cfg: TrainConfig, under_ray: bool) -> Iterator[Path | None]:
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
    yield None if under_ray else _latest_local(cfg.stage_dir / "checkpoints")


class _StepLog:
    """Rank 0's append-only per-step record (global step, data position, loss): resume audit trail."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one stage on this rank (see the module docstring for the checkpoint contract)."""
    quiet_known_noise()
    cfg = config if isinstance(config, TrainConfig) else from_dict(TrainConfig, dict(config))
    under_ray = ray_train_active()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    world, rank, _ = init_distributed(use_gpu)
    ds = import_deepspeed()
    import torch.distributed as dist

    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.train.data import BatchBuilder, ShardPlan, build_source, iterate_batches

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage_dir = cfg.stage_dir
    t_start = time.time()

    emb_cfg = _embedder_config(cfg, use_gpu)
    torch.manual_seed(cfg.seed)  # the fresh LoRA's init: same seed, same run (any ZeRO stage)
    embedder = Embedder.build(emb_cfg)
    module = TrainModule(embedder, cfg.zero_stage)
    source = build_source(cfg)
    plan = ShardPlan(len(source), world, rank, cfg.per_device_batch, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    ds_config = deepspeed_config(cfg, bf16=emb_cfg.dtype == "bfloat16")
    engine = init_engine(ds, module, ds_config, cfg, total)
    start = resume_step(engine, cfg, under_ray, world, rank, cfg.stage)

    inputs = emb_cfg.inputs
    builder = BatchBuilder(
        source, embedder.collator, cfg.data_root or ".", cfg.micro_batch, inputs.min_pixels, inputs.max_pixels
    )
    steps_log = _StepLog(stage_dir / STEPS_FILE, rank == 0)
    ckpt_root = stage_dir / "checkpoints"
    if rank == 0:
        log.info(
            "%s: %d examples, %d workers x %d = %d per step, %d steps/epoch, %d steps (from %d), zero %d",
            cfg.stage,
            len(source),
            world,
            cfg.per_device_batch,
            plan.global_batch,
            plan.steps_per_epoch,
            total,
            start,
            cfg.zero_stage,
        )
    window_t, window_steps = time.time(), 0
    last: dict[str, Any] = {}
    g = start
    for batch in iterate_batches(plan, builder, start, total, cfg.loader_workers):
        torch.manual_seed(stable_id(f"{cfg.seed}|{rank}|{g}") & 0x7FFF_FFFF)
        lr = float(engine.get_lr()[0])  # the rate this step uses
        out, grad_norm = train_step(engine, batch, make_loss_fn(cfg, batch))
        g += 1
        window_steps += 1
        loss = out.loss.detach().float()
        if cfg.objective == "distill" and world > 1:  # local mean per rank -> global mean for logging
            dist.all_reduce(loss)
            loss /= world
        steps_log.write(
            {
                "step": g,
                "epoch": batch.epoch,
                "batch": batch.step,
                "indices": batch.indices,
                "loss": float(loss),
                "grad_norm": grad_norm,
                "dropped": batch.dropped,
            }
        )
        state = {
            "global_step": g,
            "epoch": batch.epoch,
            "step_in_epoch": batch.step + 1,
            "samples": g * plan.global_batch,
            "total_steps": total,
            "world_size": world,
            "per_device_batch": cfg.per_device_batch,
            "seed": cfg.seed,
            "stage": cfg.stage,
        }
        metrics: dict[str, Any] = {}
        if g % cfg.log_every == 0 or g == total:
            tau = current_tau(embedder, cfg.zero_stage)
            elapsed = max(time.time() - window_t, 1e-9)
            metrics = {
                "step": g,
                "epoch": batch.epoch,
                "loss": float(loss),
                "accuracy": float(out.accuracy),
                "tau": tau,
                "lr": lr,
                "samples_per_s": window_steps * plan.global_batch / elapsed,
                "grad_norm": grad_norm,
            }
            window_t, window_steps = time.time(), 0
            last = metrics
            if rank == 0:
                log.info(
                    "%s step %d/%d loss %.4f acc %.3f tau %.4f lr %.2e %.1f samples/s",
                    cfg.stage,
                    g,
                    total,
                    metrics["loss"],
                    metrics["accuracy"],
                    tau,
                    metrics["lr"],
                    metrics["samples_per_s"],
                )
        checkpoint_or_report(engine, cfg, g, total, state, metrics, rank, under_ray, ckpt_root)
        if cfg.inject_failure_at_step and g == cfg.inject_failure_at_step and rank == 0:
            marker = stage_dir / FAILURE_MARKER
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"injected failure after step {g}\n")
                raise RuntimeError(f"injected failure after step {g} (inject_failure_at_step)")

    _finish(cfg, engine, embedder, rank, total, start, last, time.time() - t_start)


def save_merged(
    cfg: Any,
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

    `merge(out_dir)` saves the merged model and returns extra summary fields; `cfg` needs
    `zero_stage`, `model_dir` and `stage_dir` (stage and reranker configs both have them).
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
            (cfg.stage_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            log.info("%s done: model at %s", name, out)
    dist.barrier()


def _finish(
    cfg: TrainConfig,
    engine: Any,
    embedder: Any,
    rank: int,
    total: int,
    start: int,
    last: dict[str, Any],
    seconds: float,
) -> None:
    """Merge the embedder's LoRA (tau back to a scalar first) into the stage's model dir."""

    def merge(out: Path) -> dict[str, Any]:
        engine.module.restore_scalar_tau()
        embedder.merge_and_save(out)
        return {"tau": float(embedder.tau.detach().float())}

    save_merged(cfg, engine, rank, cfg.stage, merge, total, start, last, seconds)


def run_local(cfg: TrainConfig) -> Path:
    """Train a stage in this process (world size 1, no Ray); returns the merged model dir."""
    train_loop_per_worker(dataclasses.asdict(cfg))
    return cfg.model_dir
