"""Train the U-MARVEL re-ranker: a causal Qwen2-VL judge (LoRA, LM head) on Yes/No pairs.

RECIPE section 3: every training query gives one pair (query, positive) labelled "Yes" and
`negatives_per_positive` pairs (query, mined negative) labelled "No", the negatives coming from the
stage-3 model's top-100 (`mine/mine.py` output, {qid, neg_dids}). The loss is the SFT
cross-entropy of the answer token (`Reranker.loss`); the score at inference is P(Yes).

Data order: the pairs of all queries are flattened (pair `p` = query `p // (1+k)`, slot
`p % (1+k)`, slot 0 = the positive) and planned with `ShardPlan`, so epoch `e` visits a seeded
permutation, rank `r` of `W` takes `perm[r::W]` and the global step alone fixes every rank's next
batch (resume replays nothing and skips nothing). Which positive, which negatives and which
instruction a query uses in an epoch come from `MBEIRTrain.example(query, epoch)`, a function of
(seed, epoch, qid) only.

The per-worker loop, checkpoint/resume contract and Ray launch follow `train/loop.py` and
`train/trainer.py` (same helpers); outputs live under `output` (default `<run_dir>/reranker`):
`model/` (merged HF dir + umarvel_reranker.json), `checkpoints/` (without Ray), `steps.jsonl`,
`config.yaml`, `train_summary.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.config import (
    ConfigError,
    check_model_dir,
    deep_update,
    from_dict,
    option,
    require_absolute,
    to_dict,
)
from umarvel_ray.model.losses import stable_id
from umarvel_ray.progress import quiet_known_noise
from umarvel_ray.train.data import MBEIRTrain, ShardPlan, mbeir_train_inputs
from umarvel_ray.train.loop import (
    STEPS_FILE,
    _StepLog,
    checkpoint_or_report,
    deepspeed_config,
    import_deepspeed,
    init_distributed,
    init_engine,
    ray_train_active,
    resume_step,
    save_merged,
)

log = logging.getLogger(__name__)

RUN_NAME = "reranker"
Pair = tuple[dict[str, Any], dict[str, Any]]


@dataclass
class RerankerTrainConfig:
    """Everything the re-ranker's LoRA SFT run needs (model, pairs, optimisation, scale, checkpoints)."""

    model: str = option("Qwen/Qwen2-VL-7B-Instruct", "base MLLM (instruct weights, HF id or path)", path="model")
    run_dir: str = option("runs/default", "run directory (shared storage on multi-node clusters)", path="cwd")
    output: str = option("", "output dir ('' = <run_dir>/reranker); merged model goes to <output>/model", path="cwd")
    # --- data
    data_root: str = option("", "M-BEIR data root; relative data and image paths resolve here", path="cwd")
    train_file: str = option("query/train/mbeir_union_up_train.jsonl", "training queries (M-BEIR jsonl)", path="data")
    pool_file: str = option("cand_pool/global/mbeir_union_train_cand_pool.jsonl", "candidate pool", path="data")
    instructions_file: str = option("instructions/query_instructions.tsv", "query instructions tsv", path="data")
    negatives_file: str = option(
        "{run_dir}/negatives/negatives.jsonl",
        "mined negatives {qid, neg_dids} (file or its dir) from the stage-3 model's top-100; "
        "a '{run_dir}' path is taken as is, other relative paths resolve under data_root", path="data")
    negatives_per_positive: int = option(1, "'No' pairs per query per epoch (one 'Yes' pair each)")
    max_examples: int = option(0, "use only the first N training queries (0 = all)")
    # --- model / LoRA
    judge: str = option("yes_no", "yes_no (U-MARVEL) | true_false (MM-Embed prompt)")
    lora_r: int = option(128, "LoRA rank")
    lora_alpha: int = option(256, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    gradient_checkpointing: bool = option(False, "activation checkpointing (GPU runs)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    reranker: dict = option({}, "extra RerankerConfig overrides, e.g. {inputs: {max_pixels: 2352}}")
    # --- optimisation
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.03, "linear warmup fraction of total steps, then cosine decay")
    min_lr_ratio: float = option(0.0, "final lr as a fraction of the peak")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off)")
    per_device_batch: int = option(8, "pairs per worker per step")
    epochs: float = option(1.0, "passes over the pairs (used when max_steps = 0)")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = epochs)")
    seed: int = option(42, "seed for shuffling, positive/negative/instruction sampling and dropout")
    # --- distributed
    workers: int = option(1, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL, bf16")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    zero_stage: int = option(1, "DeepSpeed ZeRO stage 0-3")
    deepspeed_config: str = option("", "DeepSpeed JSON template ('' = built-in for zero_stage)", path="cwd")
    # --- logging / checkpoints / fault tolerance
    log_every: int = option(10, "log + report loss/accuracy/samples per s every N steps")
    save_every: int = option(500, "DeepSpeed checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint (Ray FailureConfig)")
    resume_from: str = option("", "checkpoint dir to resume from when not under Ray (default: latest own)", path="cwd")

    def __post_init__(self) -> None:
        if self.judge not in ("yes_no", "true_false"):
            raise ConfigError(f"judge must be yes_no or true_false, got {self.judge!r}")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.per_device_batch < 1 or self.negatives_per_positive < 1:
            raise ConfigError("per_device_batch and negatives_per_positive must be >= 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if self.log_every < 1 or self.save_every < 1:
            raise ConfigError("log_every and save_every must be >= 1")

    # ---------------------------------------------------------------- derived paths
    @property
    def stage(self) -> str:
        return RUN_NAME

    @property
    def stage_dir(self) -> Path:
        """The output directory (named like TrainConfig's so loop.py's resume helper applies)."""
        return Path(self.output.replace("{run_dir}", self.run_dir) or Path(self.run_dir) / RUN_NAME)

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    def data_path(self, value: str) -> Path:
        """'{run_dir}' expanded; relative paths resolved under data_root."""
        p = Path(value.replace("{run_dir}", str(self.run_dir)))
        return p if p.is_absolute() or not self.data_root else Path(self.data_root) / p

    def negatives_path(self) -> Path:
        """The mined negatives jsonl (a directory means its negatives.jsonl, as `read_negatives`)."""
        from umarvel_ray.data.artefacts import negatives_file

        raw = self.negatives_file
        p = Path(raw.replace("{run_dir}", str(self.run_dir))) if "{run_dir}" in raw else self.data_path(raw)
        return negatives_file(p)


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------


class RerankPairs:
    """(query, candidate, label) pairs: per query 1 'Yes' (positive) + k 'No' (mined negatives)."""

    def __init__(self, cfg: RerankerTrainConfig) -> None:
        neg = cfg.negatives_path()
        if not neg.is_file():
            raise FileNotFoundError(f"mined negatives not found: {neg} (run jobs/mine_negatives.py first)")
        self.k = cfg.negatives_per_positive
        queries, pool = mbeir_train_inputs(cfg)  # per-task files when there is no union file
        self.queries = MBEIRTrain(
            queries,
            pool,
            cfg.data_path(cfg.instructions_file),
            cfg.seed,
            negatives_path=neg,
            num_negatives=self.k,
            limit=cfg.max_examples,
        )
        if len(self.queries) == 0:
            raise ValueError(f"no training query has both a positive and a mined negative ({neg})")

    @property
    def pairs_per_query(self) -> int:
        return 1 + self.k

    def __len__(self) -> int:
        return len(self.queries) * self.pairs_per_query

    def qid(self, index: int) -> str:
        return str(self.queries.queries[index // self.pairs_per_query]["qid"])

    def pair(self, index: int, epoch: int) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Pair `index` of epoch `epoch`: (query item, candidate item, is_positive); image paths."""
        q, slot = divmod(int(index), self.pairs_per_query)
        ex = self.queries.example(q, epoch)
        if slot == 0:
            return ex["query"], ex["positive"], True
        return ex["query"], ex["negatives"][slot - 1], False


class PairBatcher:
    """Example indices -> decoded pairs -> the reranker's training batch (labels on the answer)."""

    def __init__(self, pairs: RerankPairs, reranker: Any, image_root: str | Path) -> None:
        self.pairs, self.reranker, self.root = pairs, reranker, Path(image_root)
        inputs = reranker.cfg.inputs
        self.budget = {
            k: v for k, v in (("min_pixels", inputs.min_pixels), ("max_pixels", inputs.max_pixels)) if v
        }

    def _decode(self, item: dict[str, Any]) -> dict[str, Any]:
        from umarvel_ray.data.images import load_image

        if not isinstance(item.get("image"), str):
            return item
        return {**item, "image": load_image(self.root, item["image"], **self.budget)}

    def build(self, indices: list[int], epoch: int) -> tuple[dict[str, Any], int]:
        """(collated batch, pairs dropped for undecodable images)."""
        from umarvel_ray.data.images import ImageDecodeError

        pairs: list[Pair] = []
        labels: list[bool] = []
        dropped = 0
        for i in indices:
            q, c, y = self.pairs.pair(int(i), epoch)
            try:
                pairs.append((self._decode(q), self._decode(c)))
            except ImageDecodeError as e:
                dropped += 1
                log.warning("dropping training pair %d (epoch %d): %s", i, epoch, e.reason)
                continue
            labels.append(y)
        if not pairs:
            raise RuntimeError(f"every pair of a batch (epoch {epoch}) failed to decode: {list(indices)}")
        return self.reranker.collate(pairs, labels), dropped


# ----------------------------------------------------------------------------------------------
# Model wrapper and loop
# ----------------------------------------------------------------------------------------------


class JudgeModule(nn.Module):
    """What DeepSpeed wraps: forward(batch) -> (loss, per-pair correctness) via `Reranker.loss`.

    The (B, V) answer logits are caught with a hook on the LM head during `Reranker.loss`, so the
    accuracy (is the right one of the two answer words ahead?) costs no second forward.
    """

    def __init__(self, reranker: nn.Module) -> None:
        super().__init__()
        self.reranker = reranker

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        caught: list[torch.Tensor] = []
        head = self.reranker.base_model.get_output_embeddings()
        handle = head.register_forward_hook(lambda _m, _i, out: caught.append(out.detach()))
        try:
            loss = self.reranker.loss(batch)
        finally:
            handle.remove()
        pos, neg = self.reranker.collator.answer_ids
        logits = caught[-1].float()
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = batch["labels"].to(logits.device)[rows, batch["answer_index"].to(logits.device) + 1]
        correct = (logits[:, pos] > logits[:, neg]) == (target == pos)
        return loss, correct


def reranker_config(cfg: RerankerTrainConfig, use_gpu: bool) -> Any:
    """RerankerConfig: defaults < this run's settings < `cfg.reranker` overrides."""
    from umarvel_ray.model.reranker import RerankerConfig

    data = to_dict(RerankerConfig())
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    data.update(
        model=cfg.model,
        judge=cfg.judge,
        gradient_checkpointing=cfg.gradient_checkpointing,
        dtype=dtype,
        lora={"enabled": True, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
    )
    deep_update(data, dict(cfg.reranker), "reranker")
    return from_dict(RerankerConfig, data)


def _global_mean(value: torch.Tensor, count: int, world: int) -> tuple[float, int]:
    """(sum over ranks of value*count / total count, total count); value is a local mean."""
    import torch.distributed as dist

    t = torch.tensor([float(value) * count, float(count)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0)), int(t[1])


def train_loop_per_worker(config: dict[str, Any] | RerankerTrainConfig) -> None:
    """Train the re-ranker on this rank (checkpoint/resume contract as in train/loop.py)."""
    quiet_known_noise()
    cfg = config if isinstance(config, RerankerTrainConfig) else from_dict(RerankerTrainConfig, dict(config))
    under_ray = ray_train_active()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    world, rank, _ = init_distributed(use_gpu)
    ds = import_deepspeed()

    from umarvel_ray.model.reranker import Reranker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.time()
    rr_cfg = reranker_config(cfg, use_gpu)
    torch.manual_seed(cfg.seed)  # the fresh LoRA's init: same seed, same run (any ZeRO stage)
    reranker = Reranker.build(rr_cfg)
    module = JudgeModule(reranker)
    pairs = RerankPairs(cfg)
    plan = ShardPlan(len(pairs), world, rank, cfg.per_device_batch, cfg.seed)
    if plan.steps_per_epoch < 1:
        raise ValueError(f"{len(pairs)} pairs do not fill one global batch of {plan.global_batch}")
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    ds_config = deepspeed_config(cfg, bf16=rr_cfg.dtype == "bfloat16")  # type: ignore[arg-type]
    engine = init_engine(ds, module, ds_config, cfg, total)
    start = resume_step(engine, cfg, under_ray, world, rank, "reranker")

    batcher = PairBatcher(pairs, reranker, cfg.data_root or ".")
    steps_log = _StepLog(cfg.stage_dir / STEPS_FILE, rank == 0)
    ckpt_root = cfg.stage_dir / "checkpoints"
    if rank == 0:
        log.info(
            "reranker: %d queries -> %d pairs (1 Yes + %d No), %d workers x %d = %d pairs/step, "
            "%d steps/epoch, %d steps (from %d), zero %d",
            len(pairs.queries),
            len(pairs),
            pairs.k,
            world,
            cfg.per_device_batch,
            plan.global_batch,
            plan.steps_per_epoch,
            total,
            start,
            cfg.zero_stage,
        )
    window_t, window_pairs = time.time(), 0
    last: dict[str, Any] = {}
    for g0 in range(start, total):
        epoch, step = plan.position(g0)
        indices = plan.indices(epoch, step).tolist()
        batch, dropped = batcher.build(indices, epoch)
        torch.manual_seed(stable_id(f"{cfg.seed}|{rank}|{g0}") & 0x7FFF_FFFF)
        lr = float(engine.get_lr()[0])
        loss, correct = engine(batch)
        engine.backward(loss)
        engine.step()
        g = g0 + 1
        n_local = int(correct.numel())
        mean_loss, n_global = _global_mean(loss.detach().float(), n_local, world)
        acc, _ = _global_mean(correct.float().mean(), n_local, world)
        window_pairs += n_global
        steps_log.write(
            {
                "step": g,
                "epoch": epoch,
                "batch": step,
                "indices": indices,
                "loss": mean_loss,
                "dropped": dropped,
            }
        )
        state = {
            "global_step": g,
            "epoch": epoch,
            "step_in_epoch": step + 1,
            "samples": g * plan.global_batch,
            "total_steps": total,
            "world_size": world,
            "per_device_batch": cfg.per_device_batch,
            "seed": cfg.seed,
            "stage": RUN_NAME,
        }
        metrics: dict[str, Any] = {}
        if g % cfg.log_every == 0 or g == total:
            elapsed = max(time.time() - window_t, 1e-9)
            metrics = {
                "step": g,
                "epoch": epoch,
                "loss": mean_loss,
                "accuracy": acc,
                "lr": lr,
                "samples_per_s": window_pairs / elapsed,
            }
            window_t, window_pairs = time.time(), 0
            last = metrics
            if rank == 0:
                log.info(
                    "reranker step %d/%d loss %.4f acc %.3f lr %.2e %.1f pairs/s",
                    g,
                    total,
                    mean_loss,
                    acc,
                    lr,
                    metrics["samples_per_s"],
                )
        checkpoint_or_report(engine, cfg, g, total, state, metrics, rank, under_ray, ckpt_root)

    _finish(cfg, engine, reranker, rank, total, start, last, time.time() - t_start)


def _finish(
    cfg: RerankerTrainConfig,
    engine: Any,
    reranker: Any,
    rank: int,
    total: int,
    start: int,
    last: dict[str, Any],
    seconds: float,
) -> None:
    """Rank 0 merges the LoRA and writes `<output>/model`, config.yaml and train_summary.json."""

    def merge(out: Path) -> dict[str, Any]:
        reranker.merge_and_save(out)
        return {}

    save_merged(cfg, engine, rank, RUN_NAME, merge, total, start, last, seconds)


# ----------------------------------------------------------------------------------------------
# Ray Train launch
# ----------------------------------------------------------------------------------------------


def reranker_done(cfg: RerankerTrainConfig) -> bool:
    """True when `<output>/model` holds a saved model."""
    return (cfg.model_dir / "config.json").is_file()


def build_reranker_trainer(cfg: RerankerTrainConfig) -> Any:
    """The TorchTrainer (gloo on CPU, NCCL on GPU) for the re-ranker run (not started)."""
    from umarvel_ray.train.trainer import torch_trainer

    extra = {
        "output": str(cfg.stage_dir.resolve()),
        "negatives_file": str(cfg.negatives_path().resolve()),
    }
    return torch_trainer(train_loop_per_worker, cfg, name=RUN_NAME, extra_config=extra)


def check_reranker_inputs(cfg: RerankerTrainConfig) -> None:
    """Refuse missing inputs in the user's terms, before Ray or DeepSpeed start (ConfigError)."""
    check_model_dir(cfg.model, "model")
    if not cfg.negatives_path().is_file():
        raise ConfigError(
            f"mined negatives not found: {cfg.negatives_path()}; run jobs/mine_negatives.py with the "
            "stage-3 model first, or set negatives_file= to its negatives.jsonl"
        )


def run_reranker_training(cfg: RerankerTrainConfig, force: bool = False) -> Path:
    """Train the re-ranker with Ray Train (skipped when `<output>/model` exists); returns that dir."""
    require_absolute(cfg)
    if reranker_done(cfg) and not force:
        log.info("reranker already trained: %s (skipping)", cfg.model_dir)
        return cfg.model_dir
    check_reranker_inputs(cfg)
    result = build_reranker_trainer(cfg).fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if not reranker_done(cfg):
        raise RuntimeError(f"reranker training finished but {cfg.model_dir} was not written")
    log.info("reranker: model at %s", cfg.model_dir)
    return cfg.model_dir
