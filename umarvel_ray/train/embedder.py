"""The embedder's training task: stages 1-5 of the U-MARVEL chain on `worker.run_worker`.

What differs from the re-ranker: the module (`TrainModule`: the embedder plus its learned
temperature), the example source of the stage (data.py) and its batches (batches.py), the stage
objective (`make_loss_fn`: InfoNCE, symmetric InfoNCE or KL distillation, gathered across ranks),
the step (`train_step`: plain, or GradCache when the batch comes in several micro-batches), tau in
the logged metrics, and the merge (tau back to a scalar, LoRA merged into `<stage_dir>/model`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.config import from_dict, to_dict
from umarvel_ray.model.losses import LossOutput, cached_backward, info_nce, kl_distill
from umarvel_ray.train.batches import BatchBuilder, ShardPlan, iterate_batches
from umarvel_ray.train.config import TrainConfig
from umarvel_ray.train.data import build_source
from umarvel_ray.train.worker import Placement, StepResult, run_worker


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
    data.update(model=cfg.model, tau_init=tau, learn_tau=cfg.learn_tau, **cfg.model_settings(use_gpu))
    deep_update(data, dict(cfg.embedder), "embedder")
    return from_dict(EmbedderConfig, data)


class EmbedderTask:
    """One embedder stage as a `worker.TrainTask` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def build_module(self, where: Placement) -> tuple[nn.Module, bool]:
        from umarvel_ray.model.embedder import Embedder

        self.where = where
        self.emb_cfg = _embedder_config(self.cfg, where.use_gpu)
        self.embedder = Embedder.build(self.emb_cfg)
        return TrainModule(self.embedder, self.cfg.zero_stage), self.emb_cfg.dtype == "bfloat16"

    def build_data(self) -> int:
        self.source = build_source(self.cfg)
        return len(self.source)

    def describe(self, plan: ShardPlan, total: int, start: int) -> str:
        cfg = self.cfg
        return (
            f"{cfg.stage}: {len(self.source)} examples, {plan.world} workers x {cfg.per_device_batch} = "
            f"{plan.global_batch} per step, {plan.steps_per_epoch} steps/epoch, {total} steps (from {start}), "
            f"zero {cfg.zero_stage}"
        )

    def batches(self, plan: ShardPlan, start: int, total: int) -> Iterator[Any]:
        cfg, inputs = self.cfg, self.emb_cfg.inputs
        builder = BatchBuilder(
            self.source, self.embedder.collator, cfg.data_root or ".", cfg.micro_batch, inputs.min_pixels,
            inputs.max_pixels,
        )
        self.global_batch = plan.global_batch
        return iterate_batches(plan, builder, start, total, cfg.loader_workers)

    def step(self, engine: Any, batch: Any) -> StepResult:
        import torch.distributed as dist

        out, grad_norm = train_step(engine, batch, make_loss_fn(self.cfg, batch))
        loss = out.loss.detach().float()
        world = self.where.world
        extra: dict[str, Any] = {"grad_norm": grad_norm}
        if self.cfg.objective == "distill":  # local means per rank -> global means for logging
            stats = torch.stack([loss, *(v.detach().float().to(loss.device) for v in out.metrics.values())])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            loss = stats[0]
            extra.update({k: round(float(v), 4) for k, v in zip(out.metrics, stats[1:], strict=True)})
        return StepResult(float(loss), float(out.accuracy), self.global_batch, extra)

    def log_metrics(self) -> dict[str, Any]:
        return {"tau": current_tau(self.embedder, self.cfg.zero_stage)}

    def step_message(self, m: dict[str, Any], total: int) -> str:
        entropies = (
            f" H(teacher) {m['teacher_entropy']:.3f} H(student) {m['student_entropy']:.3f}"
            if "teacher_entropy" in m
            else ""
        )
        return (
            f"{self.cfg.stage} step {m['step']}/{total} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
            f"tau {m['tau']:.4f}{entropies} lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s"
        )

    def merge(self, engine: Any, out: Path) -> dict[str, Any]:
        """Tau back to a scalar, then the embedder's LoRA merged into `out`."""
        engine.module.restore_scalar_tau()
        self.embedder.merge_and_save(out)
        return {"tau": float(self.embedder.tau.detach().float())}


def train_loop_per_worker(config: dict[str, Any] | TrainConfig) -> None:
    """Train one stage on this rank: what Ray Train's TorchTrainer runs on every worker, and what
    `torchrun` or a plain process can run directly (checkpoint contract: checkpoint.py)."""
    cfg = config if isinstance(config, TrainConfig) else from_dict(TrainConfig, dict(config))
    run_worker(EmbedderTask(cfg), cfg)


def run_local(cfg: TrainConfig) -> Path:
    """Train a stage in this process (world size 1, no Ray); returns the merged model dir."""
    train_loop_per_worker(dataclasses.asdict(cfg))
    return cfg.model_dir
