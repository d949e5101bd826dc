"""Training configs: `LoraRunConfig` (what every LoRA run shares), one `TrainConfig` per embedder
stage, the recipe's five presets (and the optional stage 6), the chain.

A stage config is resolved in layers, each overriding the one before:
`TrainConfig` defaults -> the stage preset (the stage table of docs/RECIPE.md section 3) -> the
job YAML's `common` section -> the job YAML's `<stage>` section -> CLI `stageN.key=value` /
`common.key=value`.
An empty `model` means "the merged model of the previous stage of the chain" (the base model for
the first one), which is how the chain of LoRA runs is stitched together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umarvel_ray.config import (
    RUN_DIR_TEMPLATE,
    ConfigError,
    deep_update,
    from_dict,
    is_local_model,
    option,
    resolve_paths,
    to_dict,
)
from umarvel_ray.layout import MODEL_DIR, PRESET_NEGATIVES_FILE, PRESET_TEACHER_FILE, RunLayout

STAGE_ORDER: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
# The recipe's chain; stage6 (MM-Embed's continual text fine-tuning) runs only when listed in `stages`.
DEFAULT_STAGES: tuple[str, ...] = STAGE_ORDER[:5]
DATA_KINDS: tuple[str, ...] = ("nli", "caption", "mbeir", "distill")
OBJECTIVES: tuple[str, ...] = ("infonce", "symmetric", "distill")


@dataclass
class LoraRunConfig:
    """What every LoRA training run here shares: the run and its inputs, the adapter, the
    optimisation, the workers, logging, checkpoints and fault tolerance.

    A subclass adds its own keys (YAML stays flat: these are plain fields of the subclass) and
    provides `stage` (the run's name) and `stage_dir` (its output directory); a default that
    differs between runs is overridden by redeclaring the field in the subclass.
    """

    run_dir: str = option("runs/default", "run directory (shared storage on multi-node clusters)", path="cwd")
    model: str = option("Qwen/Qwen2-VL-7B-Instruct", "base MLLM (instruct weights, HF id or path)", path="model")
    # --- data
    data_root: str = option("", "M-BEIR style data root; relative data paths and image paths resolve here", path="cwd")
    train_file: str = option("query/train/mbeir_union_up_train.jsonl", "training examples (jsonl)", path="data")
    pool_file: str = option("cand_pool/global/mbeir_union_train_cand_pool.jsonl", "candidate pool (mbeir)", path="data")
    instructions_file: str = option("instructions/query_instructions.tsv", "query instructions tsv (mbeir)", path="data")
    max_examples: int = option(0, "use only the first N examples (0 = all); for quick runs")
    holdout_fraction: float = option(
        0.0, "M-BEIR train queries held out of training by a hash of the qid (data/holdout.py); the "
        "re-ranker's quality check and the distillation teacher use them (0 = none: the paper's choice)")
    # --- model / LoRA
    lora_r: int = option(128, "LoRA rank")
    lora_alpha: int = option(256, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    gradient_checkpointing: bool = option(False, "activation checkpointing (recipe: on, GPU)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    # --- optimisation
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.03, "linear warmup fraction of total steps, then cosine decay")
    min_lr_ratio: float = option(0.0, "final lr as a fraction of the peak")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off)")
    per_device_batch: int = option(8, "examples per worker per step")
    epochs: float = option(1.0, "passes over the data (used when max_steps = 0)")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = epochs)")
    seed: int = option(42, "seed for shuffling, positive/negative/instruction sampling and dropout")
    # --- distributed
    workers: int = option(1, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL, bf16")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker")
    zero_stage: int = option(1, "DeepSpeed ZeRO stage 0-3 (recipe: 1)")
    deepspeed_config: str = option(
        "", "DeepSpeed JSON template ('' = built-in for zero_stage); 'auto' values filled", path="cwd")
    # --- logging / checkpoints / fault tolerance
    log_every: int = option(10, "log + report metrics every N steps")
    save_every: int = option(500, "DeepSpeed checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept (Ray CheckpointConfig.num_to_keep)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint (Ray FailureConfig)")
    resume_from: str = option("", "checkpoint dir to resume from when not under Ray (default: latest own)", path="cwd")

    def __post_init__(self) -> None:
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")

    # ---------------------------------------------------------------- derived paths
    @property
    def model_dir(self) -> Path:
        """Where the merged model of this run is written (`stage_dir` is the subclass's)."""
        return self.stage_dir / MODEL_DIR

    @property
    def failure_step(self) -> int:
        """Testing: rank 0 raises once after this step (0 = never). Only TrainConfig has a key
        for it (`inject_failure_at_step`)."""
        return 0

    def model_settings(self, use_gpu: bool) -> dict[str, Any]:
        """The model-config keys every run sets alike: activation checkpointing, the dtype ('auto' =
        bf16 on GPU, fp32 on CPU) and a fresh LoRA of this run's shape."""
        return {
            "gradient_checkpointing": self.gradient_checkpointing,
            "dtype": self.dtype if self.dtype != "auto" else ("bfloat16" if use_gpu else "float32"),
            "lora": {"enabled": True, "r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout},
        }

    def expand(self, value: str) -> str:
        return value.replace(RUN_DIR_TEMPLATE, str(self.run_dir))

    def data_path(self, value: str) -> Path:
        """A data path: '{run_dir}' expanded, relative paths resolved under data_root."""
        p = Path(self.expand(value))
        return p if p.is_absolute() or not self.data_root else Path(self.data_root) / p


@dataclass
class TrainConfig(LoraRunConfig):
    """Everything one LoRA training stage of the embedder needs (on top of LoraRunConfig)."""

    stage: str = option("stage3", "stage name; outputs go to <run_dir>/<stage>/")
    model: str = option("", "base HF id/path; '' = previous stage's merged model; '{run_dir}' is expanded", path="model")
    # --- data
    data_kind: str = option("mbeir", "nli | caption | mbeir | distill (which example builder)")
    negatives_file: str = option("", "mined negatives jsonl {qid, neg_dids} (stage 4); '{run_dir}' expanded", path="data")
    teacher_file: str = option("", "teacher jsonl {qid, candidates, scores} (stage 5); '{run_dir}' expanded", path="data")
    num_negatives: int = option(
        0, "hard negatives per query (nli: 0/1 = its hard_neg; mbeir: from negatives_file)"
    )
    num_candidates: int = option(50, "candidates per query for distillation (shorter lists are masked)")
    modalities: list[str] = option(
        [], "mbeir: train only on tasks of these query->candidate modalities, e.g. [text->text] "
        "(data.catalogue.TASK_MODALITIES; [] = every task)"
    )
    upsample_min: int = option(
        0, "without a union train file: repeat each task's train queries ceil(N/rows) times "
        "(data.tasks.upsample_factors; 0 = off)"
    )
    loader_workers: int = option(0, "DataLoader worker processes for decode + collate (0 = in the loop)")
    # --- objective
    objective: str = option("infonce", "infonce (q->c) | symmetric (q->c + c->q) | distill (KL)")
    tau_init: float = option(0.05, "initial temperature (a previous stage's learned tau is inherited)")
    learn_tau: bool = option(True, "learn log(tau) (frozen in stages 1-2)")
    inherit_tau: bool = option(True, "start from the tau stored with the input model when it has one")
    mask_false_negatives: bool = option(True, "remove in-batch candidates equal to a row's positive")
    teacher_gate: bool = option(
        True, "distill: train only when the teacher's fused ranking beats cos alone on its queries "
        "(teacher_quality.json); otherwise the stage keeps its starting model and says why (train/gate.py)")
    # --- model
    embedder: dict = option(
        {}, "extra EmbedderConfig overrides, e.g. {pooling: mean, inputs: {max_pixels: 2352}}"
    )
    # --- optimisation (defaults that differ from LoraRunConfig's)
    lr: float = option(4e-4, "peak learning rate (AdamW)")
    per_device_batch: int = option(60, "queries per worker per step (in-batch negatives = workers x this)")
    micro_batch: int = option(0, "GradCache micro-batch (0 = no cache, encode the whole per-device batch)")
    # --- fault tolerance
    inject_failure_at_step: int = option(0, "testing: rank 0 raises once after this step (0 = never)")

    def __post_init__(self) -> None:
        if self.data_kind not in DATA_KINDS:
            raise ConfigError(f"data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if (self.objective == "distill") != (self.data_kind == "distill"):
            raise ConfigError("objective 'distill' goes with data_kind 'distill' and only with it")
        if self.per_device_batch < 1 or self.micro_batch < 0:
            raise ConfigError("per_device_batch must be >= 1 and micro_batch >= 0")
        check_modalities(self.modalities)
        if self.modalities and self.data_kind != "mbeir":
            raise ConfigError(f"modalities selects M-BEIR tasks: it needs data_kind 'mbeir', not {self.data_kind!r}")
        super().__post_init__()

    # ---------------------------------------------------------------- derived paths
    @property
    def stage_dir(self) -> Path:
        return RunLayout(self.run_dir).stage_dir(self.stage)

    @property
    def failure_step(self) -> int:
        return self.inject_failure_at_step


def check_modalities(modalities: list[str]) -> None:
    """ConfigError unless every entry is 'QUERY->CANDIDATE' of an M-BEIR task (text->text, ...)."""
    from umarvel_ray.data.catalogue import TASK_MODALITIES

    known = sorted({f"{q}->{c}" for q, c in TASK_MODALITIES.values()})
    bad = [m for m in modalities if m not in known]
    if bad:
        raise ConfigError(f"modalities: unknown {bad}; known query->candidate pairs: {known}")


# The stage table of docs/RECIPE.md section 3. Only what differs from the TrainConfig defaults is listed.
# stage6 is MM-Embed's continual text-to-text fine-tuning (section 4), optional, after stage 5: the
# text->text tasks of the M-BEIR train data (WebQA task 1) with the mined hard negatives, stage 4's
# small learning rate and batch (MM-Embed's own values are not in our notes).
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "stage1": dict(
        data_kind="nli",
        train_file="pretrain/nli_pairs.jsonl",
        objective="infonce",
        num_negatives=1,
        lora_r=64,
        lora_alpha=128,
        lr=2e-4,
        per_device_batch=72,
        epochs=2.0,
        learn_tau=False,
    ),
    "stage2": dict(
        data_kind="caption",
        train_file="pretrain/caption_pairs.jsonl",
        objective="symmetric",
        num_negatives=0,
        lora_r=128,
        lora_alpha=256,
        lr=1e-4,
        per_device_batch=60,
        epochs=1.0,
        learn_tau=False,
    ),
    "stage3": dict(
        data_kind="mbeir",
        objective="infonce",
        num_negatives=0,
        lora_r=128,
        lora_alpha=256,
        lr=4e-4,
        per_device_batch=60,
        epochs=1.0,
        learn_tau=True,
    ),
    "stage4": dict(
        data_kind="mbeir",
        objective="infonce",
        num_negatives=5,
        negatives_file=PRESET_NEGATIVES_FILE,
        lora_r=128,
        lora_alpha=256,
        lr=1.5e-5,
        per_device_batch=17,
        epochs=1.0,
        learn_tau=True,
    ),
    "stage5": dict(
        data_kind="distill",
        objective="distill",
        teacher_file=PRESET_TEACHER_FILE,
        num_candidates=50,
        lora_r=128,
        lora_alpha=256,
        lr=1e-5,
        per_device_batch=2,
        epochs=1.0,
        learn_tau=True,
    ),
}
# MM-Embed's continual text->text fine-tuning: stage 4's settings on the text->text tasks only.
STAGE_PRESETS["stage6"] = dict(STAGE_PRESETS["stage4"], modalities=["text->text"])


@dataclass
class TrainJobConfig:
    """`jobs/train.py` config: shared settings, per-stage sections, and which stages to run."""

    run_dir: str = option("runs/default", "run directory shared by all stages", path="cwd")
    data_root: str = option("", "data root (M-BEIR layout)", path="cwd")
    model: str = option("Qwen/Qwen2-VL-7B-Instruct", "base model of the first stage of the chain", path="model")
    stages: list[str] = option(
        list(DEFAULT_STAGES), "stages to run, in order (the chain order is STAGE_ORDER; stage6 is optional)"
    )
    common: dict = option({}, "TrainConfig keys applied to every stage (below the stage sections)", keys_of=TrainConfig)
    stage1: dict = option({}, "TrainConfig overrides for stage 1 (text pairs)", keys_of=TrainConfig)
    stage2: dict = option({}, "TrainConfig overrides for stage 2 (caption -> image)", keys_of=TrainConfig)
    stage3: dict = option({}, "TrainConfig overrides for stage 3 (M-BEIR instruction tuning)", keys_of=TrainConfig)
    stage4: dict = option({}, "TrainConfig overrides for stage 4 (hard negatives)", keys_of=TrainConfig)
    stage5: dict = option({}, "TrainConfig overrides for stage 5 (distillation)", keys_of=TrainConfig)
    stage6: dict = option(
        {}, "TrainConfig overrides for stage 6 (optional continual text->text fine-tuning)", keys_of=TrainConfig
    )

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")


def stage_config(job: TrainJobConfig, name: str) -> TrainConfig:
    """Resolve one stage: defaults < preset < common < stage section; chain the input model."""
    if name not in STAGE_ORDER:
        raise ConfigError(f"unknown stage {name!r}; known: {list(STAGE_ORDER)}")
    data = to_dict(TrainConfig())
    deep_update(data, dict(STAGE_PRESETS[name]), f"preset {name}")
    data.update(stage=name, run_dir=job.run_dir, data_root=job.data_root)
    deep_update(data, dict(job.common), "common")
    deep_update(data, dict(getattr(job, name)), name)
    data["stage"], data["run_dir"] = name, job.run_dir
    cfg = from_dict(TrainConfig, data, name)
    if not cfg.model:
        chain = [s for s in STAGE_ORDER if s in job.stages or s == name]
        idx = chain.index(name)
        cfg = dataclasses.replace(
            cfg, model=job.model if idx == 0 else str(RunLayout(job.run_dir).stage_model(chain[idx - 1]))
        )
    return resolve_paths(cfg)


def resolve_stages(job: TrainJobConfig, only: str | None = None) -> list[TrainConfig]:
    """The stage configs to run, in chain order (`only` picks a single stage)."""
    names = [s for s in STAGE_ORDER if s in job.stages]
    if only is not None:
        if only not in STAGE_ORDER:
            raise ConfigError(f"unknown stage {only!r}; known: {list(STAGE_ORDER)}")
        names = [only]
    return [stage_config(job, n) for n in names]


def check_start_model(cfg: TrainConfig) -> None:
    """Refuse, in the user's terms, a stage whose starting model is a local directory that is not
    there (a hub id is left to `from_pretrained`). Call before any Ray or DeepSpeed start-up.

    Raises ConfigError naming the stage, the path, and the two ways out.
    """
    model = cfg.model
    if not model:
        raise ConfigError(f"{cfg.stage}: no starting model; set {cfg.stage}.model=<HF id or directory>")
    if not is_local_model(model, Path.cwd()) or (Path(model) / "config.json").is_file():
        return
    previous = next((s for s in STAGE_ORDER if Path(model) == RunLayout(cfg.run_dir).stage_model(s)), None)
    if previous is None:
        raise ConfigError(
            f"{cfg.stage}: starting model {model} does not exist (no config.json); set model= (the "
            f"chain's base) or {cfg.stage}.model= to an HF id or a model directory"
        )
    raise ConfigError(
        f"{cfg.stage} starts from {previous}'s merged model {model}, which does not exist yet. Either "
        f"run {previous} first (jobs/train.py --stage {previous}, or list it in stages=[...]), or start "
        f"the chain at {cfg.stage}: set {cfg.stage}.model=<HF id or directory>, or stages=[{cfg.stage},...] "
        "to train from the job's model="
    )
