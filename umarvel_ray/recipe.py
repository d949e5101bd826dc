"""The whole U-MARVEL recipe as one restartable chain (`jobs/recipe.py`).

data -> base model -> eval(base) -> stage1 -> eval -> stage2 -> eval -> stage3 -> eval -> mine
negatives (union pool) -> stage4 -> eval -> mine the re-ranker's negatives (each task's local pool)
-> reranker (Yes/No judge) -> teacher scores (stage-4 retrieval, cos + w * P(Yes), with its quality)
-> stage5 (distillation, gated on the teacher's quality) -> eval -> eval with U-MARVEL+ reranking
-> eval with MM-Embed zero-shot reranking (the base MLLM)

Every evaluation is a row of the summary table (`recipe_summary.md`), local and global averages,
with the per-task tables in `eval/<row>/mbeir.md`.

Each step is one library call that writes its artefacts under `run_dir` and is skipped when its
finished output is already there, so a killed pipeline resubmitted with the same config carries on
where it stopped (training stages resume from their last DeepSpeed checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, deep_update, from_dict, require_absolute, save_config, to_dict
from umarvel_ray.eval.plan import EvalConfig
from umarvel_ray.io import atomic_write_text
from umarvel_ray.layout import RERANKER_STAGE, RunLayout
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.progress import summary
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.train.config import STAGE_ORDER, TrainJobConfig, stage_config
from umarvel_ray.train.gate import skipped_reason
from umarvel_ray.train.reranker import RerankerTrainConfig

log = logging.getLogger("umarvel_ray.recipe")

STEPS: tuple[str, ...] = (
    "data",
    "base_model",
    "eval_base",
    "stage1",
    "eval_stage1",
    "stage2",
    "eval_stage2",
    "stage3",
    "eval_stage3",
    "mine",
    "stage4",
    "eval_stage4",
    "mine_reranker",
    "reranker",
    "teacher",
    "stage5",
    "eval_stage5",
    "eval_umarvel_plus",
    "eval_zeroshot",
)
EVAL_STAGES = {f"eval_{s}": s for s in STAGE_ORDER}
RERANK_EVALS = {"eval_umarvel_plus": "umarvel+", "eval_zeroshot": "zeroshot"}
RERANKER_INITS = ("base", "stage3")
TINY = "tiny"


@dataclass
class RecipeConfig:
    """`jobs/recipe.py` config: where things live, which steps run, and each step's settings."""

    run_dir: str = field(default="runs/toy", metadata={"path": "cwd", "help": "every artefact of the run goes here"})
    data_root: str = field(default="data/toy_mbeir", metadata={"path": "cwd", "help": "M-BEIR directory (real or toy)"})
    toy_size: str = field(
        default="", metadata={"help": "generate the toy benchmark at data_root when missing: small|medium"}
    )
    toy_seed: int = field(default=0, metadata={"help": "toy benchmark seed"})
    base_model: str = field(
        default=TINY,
        metadata={"path": "model", "help": "HF id or path of the base MLLM; 'tiny' builds the offline tiny Qwen2-VL"},
    )
    steps: list[str] = field(default_factory=lambda: list(STEPS), metadata={"help": "steps to run, in order"})
    holdout_fraction: float = field(
        default=0.0,
        metadata={"help": "train queries held out of stages 3-4 and the re-ranker (data/holdout.py); the "
                  "re-ranker's quality and the teacher's queries come from them (0 = none, the paper's choice)"},
    )
    reranker_init: str = field(
        default="base",
        metadata={"help": "the re-ranker's starting weights: base (the instruct MLLM, the paper's choice) | "
                  "stage3 (the stage-3 merged model: for a base without world knowledge, like the tiny toy one)"},
    )
    reranker_mine: dict = field(
        default_factory=lambda: {"pool": "local"},
        metadata={"help": "MineConfig overrides (on top of `mine`) for the re-ranker's negatives: each task's "
                  "local top-K of the stage-3 model, same modality (the paper's choice)"},
    )
    train: TrainJobConfig = field(default_factory=TrainJobConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    reranker: RerankerTrainConfig = field(default_factory=RerankerTrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"steps: unknown {unknown}; known: {list(STEPS)}")
        if self.toy_size not in ("", "small", "medium"):
            raise ConfigError(f"toy_size must be '', small or medium, got {self.toy_size!r}")
        if self.reranker_init not in RERANKER_INITS:
            raise ConfigError(f"reranker_init must be one of {RERANKER_INITS}, got {self.reranker_init!r}")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")


class MissingStageOutput(FileNotFoundError):
    """A step needs the output of an earlier step of the chain that is not there."""


class Recipe:
    """Runs the steps of a `RecipeConfig`; each `step_*` method is idempotent."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.layout = RunLayout(self.run_dir)
        self.data_root = Path(cfg.data_root)
        self.scores: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ paths
    @property
    def base_model_dir(self) -> str:
        return str(self.layout.base_model()) if self.cfg.base_model == TINY else self.cfg.base_model

    def stage_model(self, stage: str) -> Path:
        return self.layout.stage_model(stage)

    def train_job(self) -> TrainJobConfig:
        job = dataclasses.replace(
            self.cfg.train,
            run_dir=str(self.run_dir),
            data_root=str(self.data_root),
            model=self.base_model_dir,
        )
        stage4 = {"negatives_file": str(self.layout.negatives_file()), **job.stage4}
        stage5 = {"teacher_file": str(self.layout.teacher_file()), **job.stage5}
        common = {"holdout_fraction": self.cfg.holdout_fraction, **job.common}
        return dataclasses.replace(job, common=common, stage4=stage4, stage5=stage5)

    def latest_model(self, before: str | None = None) -> str:
        """The model the chain has produced by `before` (all of it when None).

        That is the merged model of the last stage of `train.stages` before `before`, or the base
        model when the configured chain has no stage there (the chain starts after that point).

        Raises MissingStageOutput naming the stage and its path when that stage's model is not
        there: an evaluation or a later stage never silently runs on an earlier model.
        """
        stages = list(STAGE_ORDER if before is None else STAGE_ORDER[: STAGE_ORDER.index(before)])
        chain = [s for s in stages if s in self.cfg.train.stages]
        if not chain:
            return self.base_model_dir
        stage = chain[-1]
        model = self.stage_model(stage)
        if not (model / "config.json").exists():
            raise MissingStageOutput(
                f"{stage}'s merged model {model} does not exist (no config.json); run {stage} first "
                f"(steps include it, or jobs/train.py --stage {stage}), or leave it out of train.stages"
            )
        return str(model)

    # ------------------------------------------------------------------ steps
    def step_data(self) -> None:
        if (self.data_root / "query").is_dir():
            log.info("data: %s exists", self.data_root)
            return
        if not self.cfg.toy_size:
            raise FileNotFoundError(
                f"data_root {self.data_root} has no query/ folder (set toy_size to generate)"
            )
        from umarvel_ray.data.toy.builder import make_toy_mbeir

        make_toy_mbeir(self.data_root, size=self.cfg.toy_size, seed=self.cfg.toy_seed)

    def step_base_model(self) -> None:
        if self.cfg.base_model != TINY or (Path(self.base_model_dir) / "config.json").exists():
            return
        from umarvel_ray.model.tiny import make_tiny_qwen2vl

        make_tiny_qwen2vl(self.base_model_dir, seed=0)

    def _train(self, stage: str) -> None:
        from umarvel_ray.train.launch import run_stage

        if stage not in self.cfg.train.stages:
            log.info("%s: not in train.stages, skipped", stage)
            return
        run_stage(stage_config(self.train_job(), stage))

    def _evaluate(self, name: str, model: str, **overrides: Any) -> None:
        from umarvel_ray.eval.evaluate import run_evaluation

        out = self.layout.eval_dir(name)
        cfg = dataclasses.replace(
            self.cfg.eval, data_root=str(self.data_root), model=model, out_dir=str(out), **overrides
        )
        report = run_evaluation(cfg)
        self.scores[name] = {"model": model, **report.get("averages", {})}
        if overrides:
            self.scores[name]["rerank"] = {k: str(v) for k, v in overrides.items()}

    def step_eval_base(self) -> None:
        self._evaluate("base", self.base_model_dir)

    def _eval_stage(self, stage: str) -> None:
        """The row after `stage`: its merged model (a stage the chain leaves out has no row)."""
        if stage not in self.cfg.train.stages:
            log.info("eval_%s: %s is not in train.stages, no row", stage, stage)
            return
        self._evaluate(stage, str(self.stage_model(stage)))
        reason = skipped_reason(self.layout.stage_dir(stage))
        if reason:
            self.scores[stage]["skipped"] = reason

    def _eval_reranked(self, mode: str) -> None:
        """The last stage's retrieval reranked: U-MARVEL+ with the trained re-ranker, or MM-Embed's
        zero-shot judge (the untrained base MLLM, True/False prompt)."""
        if mode == "umarvel+":
            if not (self.reranker_dir / "config.json").exists():
                raise MissingStageOutput(
                    f"U-MARVEL+ reranking needs the trained re-ranker {self.reranker_dir}; run the reranker "
                    "step first, or leave eval_umarvel_plus out of steps"
                )
            judge = str(self.reranker_dir)
        else:
            judge = self.base_model_dir
        last = next((s for s in reversed(STAGE_ORDER) if s in self.cfg.train.stages), None)
        name = f"{last or 'base'}_{'umarvel_plus' if mode == 'umarvel+' else mode}"
        self._evaluate(name, self.latest_model(), rerank=mode, rerank_model=judge)
    def _mine(self, out: Path, overrides: dict[str, Any]) -> None:
        from umarvel_ray.data.artefacts import negatives_file
        from umarvel_ray.mine.run import run_mining

        if negatives_file(out).exists():
            log.info("mine: %s exists", negatives_file(out))
            return
        cfg = dataclasses.replace(
            self.cfg.mine,
            data_root=str(self.data_root),
            model=self.latest_model(before="stage4"),
            output_dir=str(out),
        )
        if overrides:
            data = to_dict(cfg)
            deep_update(data, dict(overrides), "reranker_mine")
            cfg = from_dict(MineConfig, data, "reranker_mine")
        run_mining(cfg)

    def step_mine(self) -> None:
        """Stage 4's negatives: the stage-3 model's top-K over the union pool (`mine`)."""
        self._mine(self.layout.negatives_dir(), {})

    def step_mine_reranker(self) -> None:
        """The re-ranker's negatives: `mine` with `reranker_mine` on top (each task's local pool).

        Same stage-3 model as `mine`, so the embeddings `mine` made (its summary.json names them)
        are searched again rather than recomputed.
        """
        from umarvel_ray.io import read_json_or_none

        union = read_json_or_none(self.layout.negatives_dir() / "summary.json") or {}
        shared = {k: union[k] for k in ("query_embeddings", "pool_embeddings") if union.get(k)}
        self._mine(self.layout.negatives_dir(RERANKER_STAGE), {**shared, **self.cfg.reranker_mine})

    def reranker_negatives(self) -> Path:
        """The re-ranker's own negatives when the chain mines them, else stage 4's."""
        if "mine_reranker" in self.cfg.steps:
            return self.layout.negatives_file(RERANKER_STAGE)
        return self.layout.negatives_file()

    @property
    def reranker_dir(self) -> Path:
        return self.layout.reranker_model()

    def step_reranker(self) -> None:
        from umarvel_ray.train.launch import run_reranker_training

        init = self.base_model_dir if self.cfg.reranker_init == "base" else self.latest_model(before="stage4")
        log.info("reranker: starts from %s (reranker_init=%s)", init, self.cfg.reranker_init)
        cfg = dataclasses.replace(
            self.cfg.reranker,
            model=init,
            run_dir=str(self.run_dir),
            output=str(self.reranker_dir.parent),
            data_root=str(self.data_root),
            negatives_file=str(self.reranker_negatives()),
            holdout_fraction=self.cfg.holdout_fraction,
        )
        run_reranker_training(cfg)

    def step_teacher(self) -> None:
        from umarvel_ray.teacher.run import run_teacher_scoring

        if self.layout.teacher_file().exists():
            log.info("teacher: %s exists", self.layout.teacher_file())
            return
        run_teacher_scoring(self.teacher_config())

    def teacher_config(self) -> TeacherConfig:
        """Teacher = the stage-4 retriever's cos + w * P(Yes) of the trained re-ranker.

        Cos only when the recipe's steps leave the re-ranker out (said in the log); when they
        include it, its model must exist (MissingStageOutput otherwise).
        """
        reranker = None
        if "reranker" in self.cfg.steps:
            if not (self.reranker_dir / "config.json").exists():
                raise MissingStageOutput(
                    f"reranker's merged model {self.reranker_dir} does not exist (no config.json); run the "
                    "reranker step first, or leave 'reranker' out of steps for a cos-only teacher"
                )
            reranker = str(self.reranker_dir)
        else:
            log.info("teacher: 'reranker' is not in steps, so the teacher is cos only")
        return dataclasses.replace(
            self.cfg.teacher,
            data_root=str(self.data_root),
            model=self.latest_model(before="stage5"),
            output_dir=str(self.layout.teacher_dir()),
            reranker=reranker,
            holdout_fraction=self.cfg.holdout_fraction,
        )

    # ------------------------------------------------------------------ driver
    def check_inputs(self) -> None:
        """Refuse, before any work, a chain whose training data is missing (say stage 1 on a data
        directory without `pretrain/`); data the `data` step is about to generate is not checked."""
        if "data" in self.cfg.steps and not (self.data_root / "query").is_dir():
            return
        from umarvel_ray.train.inputs import check_stage_inputs

        job = self.train_job()
        for stage in self.cfg.train.stages:
            if stage in self.cfg.steps:
                check_stage_inputs(stage_config(job, stage))

    def serve_command(self) -> str | None:
        """The `serve run` command that serves the chain's final model over its evaluation's global
        index (None until that evaluation has built it)."""
        last = next((s for s in reversed(STAGE_ORDER) if s in self.cfg.train.stages), "base")
        index = self.layout.eval_dir(last) / "index" / "global"
        embeddings = self.layout.eval_dir(last) / "embeddings" / "pool-global"
        if not (index.with_name("global.meta.json").is_file() and (embeddings / "manifest.json").is_file()):
            return None
        args = [f"model_dir={self.latest_model()}", f"index_dir={index}", f"embeddings_dir={embeddings}"]
        if "reranker" in self.cfg.steps and (self.reranker_dir / "config.json").is_file():
            args.append(f"reranker_dir={self.reranker_dir}")
        return "serve run umarvel_ray.serve.app:build_app " + " ".join(args)

    def run(self) -> dict[str, Any]:
        self.check_inputs()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir, self.layout.recipe_config().name)
        for step in self.cfg.steps:
            start = time.perf_counter()
            log.info("=== step %s", step)
            if step in STAGE_ORDER:
                self._train(step)
            elif step in EVAL_STAGES:
                self._eval_stage(EVAL_STAGES[step])
            elif step in RERANK_EVALS:
                self._eval_reranked(RERANK_EVALS[step])
            else:
                getattr(self, f"step_{step}")()
            self.timings[step] = round(time.perf_counter() - start, 1)
            log.info("=== step %s done in %.1fs", step, self.timings[step])
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        result = {"run_dir": str(self.run_dir), "timings_s": self.timings, "scores": self.scores}
        atomic_write_text(self.layout.recipe_summary("json"), json.dumps(result, indent=2))
        lines = ["| model | local avg | global avg | note |", "|---|---|---|---|"]
        for name, s in self.scores.items():
            lines.append(f"| {name} | {_pct(s.get('local'))} | {_pct(s.get('global'))} | {_note(s)} |")
        table = "\n".join(lines)
        atomic_write_text(self.layout.recipe_summary("md"), table + "\n")
        print(table)
        command = self.serve_command()
        if command:
            result["serve_command"] = command
            print(f"Serve this model: {command}", flush=True)
        summary(
            "recipe",
            steps=len(self.timings),
            seconds=round(sum(self.timings.values()), 1),
            **{f"{k}_local": _pct(v.get("local")) for k, v in self.scores.items()},
        )
        return result


def _note(score: dict[str, Any]) -> str:
    """What a row is beyond its model: a skipped stage's reason, a reranked row's reranker."""
    if score.get("skipped"):
        return f"skipped: {score['skipped']}"
    rerank = score.get("rerank")
    if rerank:
        return f"{rerank['rerank']} rerank by {Path(rerank['rerank_model']).parent.name}/{Path(rerank['rerank_model']).name}"
    return ""


def _pct(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("value")
    return "-" if value is None else f"{100 * float(value):.1f}"


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    require_absolute(cfg)
    return Recipe(cfg).run()
