"""DeepSpeed plumbing: the lazy import, the process group, the stage's DeepSpeed config, the LR
schedule and the engine over a module's trainable parameters (one engine per rank)."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.model.losses import dist_world
from umarvel_ray.train.config import LoraRunConfig


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


def deepspeed_config(cfg: LoraRunConfig, bf16: bool) -> dict[str, Any]:
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


def init_engine(
    ds: Any, module: nn.Module, ds_config: dict[str, Any], cfg: LoraRunConfig, total: int
) -> Any:
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

