"""The whole U-MARVEL recipe as one restartable chain (`jobs/recipe.py`).

data -> base model -> eval(base) -> stage1 -> stage2 -> stage3 -> eval(stage3) -> mine negatives
-> stage4 -> reranker (Yes/No judge on the mined negatives) -> teacher scores (stage-4 retrieval,
cos + w * P(Yes)) -> stage5 (distillation) -> eval(final)

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

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.eval.plan import EvalConfig
from umarvel_ray.io import atomic_write_text
from umarvel_ray.layout import RunLayout
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.progress import summary
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.train.config import STAGE_ORDER, TrainJobConfig, stage_config
from umarvel_ray.train.reranker import RerankerTrainConfig

log = logging.getLogger("umarvel_ray.recipe")

STEPS: tuple[str, ...] = (
    "data",
    "base_model",
    "eval_base",
    "stage1",
    "stage2",
    "stage3",
    "eval_stage3",
    "mine",
    "stage4",
    "reranker",
    "teacher",
    "stage5",
    "eval_final",
)
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
        return dataclasses.replace(job, stage4=stage4, stage5=stage5)

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

    def _evaluate(self, name: str, model: str) -> None:
        from umarvel_ray.eval.evaluate import run_evaluation

        out = self.layout.eval_dir(name)
        cfg = dataclasses.replace(self.cfg.eval, data_root=str(self.data_root), model=model, out_dir=str(out))
        report = run_evaluation(cfg)
        self.scores[name] = {"model": model, **report.get("averages", {})}

    def step_eval_base(self) -> None:
        self._evaluate("base", self.base_model_dir)

    def step_eval_stage3(self) -> None:
        self._evaluate("stage3", self.latest_model(before="stage4"))

    def step_eval_final(self) -> None:
        self._evaluate("final", self.latest_model())

    def step_mine(self) -> None:
        from umarvel_ray.mine.run import run_mining

        out = self.layout.negatives_dir()
        if self.layout.negatives_file().exists():
            log.info("mine: %s exists", self.layout.negatives_file())
            return
        cfg = dataclasses.replace(
            self.cfg.mine,
            data_root=str(self.data_root),
            model=self.latest_model(before="stage4"),
            output_dir=str(out),
        )
        run_mining(cfg)

    @property
    def reranker_dir(self) -> Path:
        return self.layout.reranker_model()

    def step_reranker(self) -> None:
        from umarvel_ray.train.launch import run_reranker_training

        cfg = dataclasses.replace(
            self.cfg.reranker,
            model=self.base_model_dir,
            run_dir=str(self.run_dir),
            output=str(self.reranker_dir.parent),
            data_root=str(self.data_root),
            negatives_file=str(self.layout.negatives_file()),
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
        """The `serve run` command that serves the chain's final model over the evaluation's
        global index (None until eval_final has built it)."""
        index = self.layout.eval_dir("final") / "index" / "global"
        embeddings = self.layout.eval_dir("final") / "embeddings" / "pool-global"
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
            else:
                getattr(self, f"step_{step}")()
            self.timings[step] = round(time.perf_counter() - start, 1)
            log.info("=== step %s done in %.1fs", step, self.timings[step])
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        result = {"run_dir": str(self.run_dir), "timings_s": self.timings, "scores": self.scores}
        atomic_write_text(self.layout.recipe_summary("json"), json.dumps(result, indent=2))
        lines = ["| model | local avg | global avg |", "|---|---|---|"]
        for name, s in self.scores.items():
            lines.append(f"| {name} | {_pct(s.get('local'))} | {_pct(s.get('global'))} |")
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


def _pct(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("value")
    return "-" if value is None else f"{100 * float(value):.1f}"


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    require_absolute(cfg)
    return Recipe(cfg).run()
