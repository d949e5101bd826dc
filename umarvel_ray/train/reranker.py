"""Train the U-MARVEL re-ranker: a causal Qwen2-VL judge (LoRA, LM head) on Yes/No pairs.

docs/RECIPE.md section 3: every training query gives one pair (query, positive)
labelled "Yes" and `negatives_per_positive` pairs (query, mined negative) labelled "No", the
negatives coming from the stage-3 model's local top-100 (jobs/mine_negatives.py pool=local output,
{qid, neg_dids}: same-task, same-modality distractors, the kind the judge sees at teacher and eval
time). The loss is the cross-entropy over the two answer words' logits (`Reranker.loss`: softmax
over [Yes, No]); the score at inference is P(Yes) from the same two logits.

Initialisation: `model` is the judge's start, either the base VLM (the paper) or the trained
stage-3 embedder's merged dir (the toy: a tiny random base knows nothing, the stage-3 model has
learned the toy's queries and candidates). Both are plain Qwen2-VL dirs; the judge always runs
causally with the LM head (`Reranker.answer_logits`), whatever attention the embedder used.

Held-out quality (reranker_heldout.py): with `holdout_fraction` > 0 training uses the `train`
split only and, after the merge, rank 0 scores the held-out queries' (positive, negatives) pairs;
the pairwise accuracy and mean P(Yes) go to train_summary.json ("heldout"), a log line and the
job's SUMMARY line.

Data order: the pairs of all queries are flattened (pair `p` = query `p // (1+k)`, slot
`p % (1+k)`, slot 0 = the positive) and planned with `ShardPlan`, so epoch `e` visits a seeded
permutation, rank `r` of `W` takes `perm[r::W]` and the global step alone fixes every rank's next
batch (resume replays nothing and skips nothing). Which positive, which negatives and which
instruction a query uses in an epoch come from `MBEIRTrain.example(query, epoch)`, a function of
(seed, epoch, qid) only.

The run is `worker.run_worker` over `RerankerTask` (checkpoint/resume contract: checkpoint.py;
Ray launch: launch.py); outputs live under `output` (default `<run_dir>/reranker`): `model/`
(merged HF dir + umarvel_reranker.json), `checkpoints/` (without Ray), `steps.jsonl`,
`config.yaml`, `train_summary.json`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umarvel_ray.config import ConfigError, check_model_dir, deep_update, from_dict, option, to_dict
from umarvel_ray.layout import PRESET_NEGATIVES_FILE, RERANKER_STAGE, RunLayout
from umarvel_ray.train.batches import ShardPlan
from umarvel_ray.train.config import LoraRunConfig
from umarvel_ray.train.data import MBEIRTrain, mbeir_train_inputs
from umarvel_ray.train.worker import Placement, StepResult, run_worker

log = logging.getLogger(__name__)

Pair = tuple[dict[str, Any], dict[str, Any]]


@dataclass
class RerankerTrainConfig(LoraRunConfig):
    """Everything the re-ranker's LoRA SFT run needs on top of LoraRunConfig: its output, the
    pairs, the judge."""

    output: str = option("", "output dir ('' = <run_dir>/reranker); merged model goes to <output>/model", path="cwd")
    # --- data
    negatives_file: str = option(
        PRESET_NEGATIVES_FILE,
        "mined negatives {qid, neg_dids} (file or its dir) from the stage-3 model's top-100; "
        "a '{run_dir}' path is taken as is, other relative paths resolve under data_root", path="data")
    negatives_per_positive: int = option(1, "'No' pairs per query per epoch (one 'Yes' pair each)")
    max_examples: int = option(0, "use only the first N training queries (0 = all)")
    heldout_max_queries: int = option(
        1000, "held-out queries scored after training when holdout_fraction > 0 (0 = all of them)")
    heldout_negatives: int = option(
        0, "held-out pairs use each query's first N mined negatives (mining keeps rank order: the N "
        "hardest); 0 = all of them")
    heldout_batch: int = option(16, "pairs per forward when scoring the held-out queries")
    per_device_batch: int = option(8, "pairs per worker per step")
    # --- model
    judge: str = option("yes_no", "yes_no (U-MARVEL) | true_false (MM-Embed prompt)")
    reranker: dict = option({}, "extra RerankerConfig overrides, e.g. {inputs: {max_pixels: 2352}}")

    def __post_init__(self) -> None:
        if self.judge not in ("yes_no", "true_false"):
            raise ConfigError(f"judge must be yes_no or true_false, got {self.judge!r}")
        if self.per_device_batch < 1 or self.negatives_per_positive < 1 or self.heldout_batch < 1:
            raise ConfigError("per_device_batch, negatives_per_positive and heldout_batch must be >= 1")
        if self.heldout_max_queries < 0 or self.heldout_negatives < 0:
            raise ConfigError("heldout_max_queries and heldout_negatives must be >= 0")
        if self.log_every < 1 or self.save_every < 1:
            raise ConfigError("log_every and save_every must be >= 1")
        super().__post_init__()

    # ---------------------------------------------------------------- derived paths
    @property
    def stage(self) -> str:
        return RERANKER_STAGE

    @property
    def stage_dir(self) -> Path:
        """The output directory (named like TrainConfig's: the worker and checkpoints use it)."""
        return Path(self.expand(self.output) or RunLayout(self.run_dir).stage_dir(RERANKER_STAGE))

    def negatives_path(self) -> Path:
        """The mined negatives jsonl (a directory means its negatives.jsonl, as `read_negatives`)."""
        from umarvel_ray.data.artefacts import negatives_file

        raw = self.negatives_file
        p = Path(self.expand(raw)) if "{run_dir}" in raw else self.data_path(raw)
        return negatives_file(p)


def check_reranker_inputs(cfg: RerankerTrainConfig) -> None:
    """Refuse missing inputs in the user's terms, before Ray or DeepSpeed start (ConfigError)."""
    check_model_dir(cfg.model, "model")
    if not cfg.negatives_path().is_file():
        raise ConfigError(
            f"mined negatives not found: {cfg.negatives_path()}; run jobs/mine_negatives.py with the "
            "stage-3 model first, or set negatives_file= to its negatives.jsonl"
        )


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
            holdout_fraction=cfg.holdout_fraction,
            split="train",
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
# Model wrapper and task
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
    data.update(model=cfg.model, judge=cfg.judge, **cfg.model_settings(use_gpu))
    deep_update(data, dict(cfg.reranker), "reranker")
    return from_dict(RerankerConfig, data)


def _global_mean(value: torch.Tensor, count: int, world: int) -> tuple[float, int]:
    """(sum over ranks of value*count / total count, total count); value is a local mean."""
    import torch.distributed as dist

    t = torch.tensor([float(value) * count, float(count)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0)), int(t[1])


@dataclass
class PairBatch:
    """One rank's step input: the collated pairs and where they come from (for the step log)."""

    epoch: int
    step: int
    indices: list[int]
    inputs: dict[str, Any]
    dropped: int


class RerankerTask:
    """The re-ranker's SFT run as a `worker.TrainTask` (see the module docstring)."""

    def __init__(self, cfg: RerankerTrainConfig) -> None:
        self.cfg = cfg

    def build_module(self, where: Placement) -> tuple[nn.Module, bool]:
        from umarvel_ray.model.reranker import Reranker
        from umarvel_ray.model.saved import EMBEDDER_META_FILE

        self.where = where
        rr_cfg = reranker_config(self.cfg, where.use_gpu)
        if where.rank == 0:
            embedder = (Path(rr_cfg.model) / EMBEDDER_META_FILE).is_file()
            start = "a trained embedder's (e.g. stage 3)" if embedder else "base"
            log.info("reranker: initialised from %s weights at %s (causal, LM head)", start, rr_cfg.model)
        self.reranker = Reranker.build(rr_cfg)
        return JudgeModule(self.reranker), rr_cfg.dtype == "bfloat16"

    def build_data(self) -> int:
        self.pairs = RerankPairs(self.cfg)
        return len(self.pairs)

    def describe(self, plan: ShardPlan, total: int, start: int) -> str:
        pairs = self.pairs
        return (
            f"reranker: {len(pairs.queries)} queries -> {len(pairs)} pairs (1 Yes + {pairs.k} No), "
            f"{plan.world} workers x {self.cfg.per_device_batch} = {plan.global_batch} pairs/step, "
            f"{plan.steps_per_epoch} steps/epoch, {total} steps (from {start}), zero {self.cfg.zero_stage}"
        )

    def batches(self, plan: ShardPlan, start: int, total: int) -> Iterator[PairBatch]:
        if plan.steps_per_epoch < 1:
            raise ValueError(f"{len(self.pairs)} pairs do not fill one global batch of {plan.global_batch}")
        return self._batches(plan, start, total, PairBatcher(self.pairs, self.reranker, self.cfg.data_root or "."))

    @staticmethod
    def _batches(plan: ShardPlan, start: int, total: int, batcher: PairBatcher) -> Iterator[PairBatch]:
        for g0 in range(start, total):
            epoch, step = plan.position(g0)
            indices = plan.indices(epoch, step).tolist()
            inputs, dropped = batcher.build(indices, epoch)
            yield PairBatch(epoch, step, indices, inputs, dropped)

    def step(self, engine: Any, batch: PairBatch) -> StepResult:
        loss, correct = engine(batch.inputs)
        engine.backward(loss)
        engine.step()
        n_local, world = int(correct.numel()), self.where.world
        mean_loss, n_global = _global_mean(loss.detach().float(), n_local, world)
        acc, _ = _global_mean(correct.float().mean(), n_local, world)
        return StepResult(mean_loss, acc, n_global)

    def log_metrics(self) -> dict[str, Any]:
        return {}

    def step_message(self, m: dict[str, Any], total: int) -> str:
        return (
            f"reranker step {m['step']}/{total} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
            f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} pairs/s"
        )

    def merge(self, engine: Any, out: Path) -> dict[str, Any]:
        """The judge's LoRA merged into `out` (with umarvel_reranker.json); with a held-out split,
        its held-out pairs scored by that merged judge (in memory, rank 0: reranker_heldout.py)."""
        self.reranker.merge_and_save(out)
        if self.cfg.holdout_fraction <= 0:
            return {}
        from umarvel_ray.train.reranker_heldout import heldout_message, score_heldout

        held = score_heldout(self.cfg, self.reranker)
        log.info("%s", heldout_message(held))
        return {"heldout": held}


def train_loop_per_worker(config: dict[str, Any] | RerankerTrainConfig) -> None:
    """Train the re-ranker on this rank (Ray Train's per-worker function; checkpoint.py has the
    checkpoint/resume contract)."""
    cfg = config if isinstance(config, RerankerTrainConfig) else from_dict(RerankerTrainConfig, dict(config))
    run_worker(RerankerTask(cfg), cfg)
