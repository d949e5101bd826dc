"""`RunLayout`: where every artefact of a recipe run lies under its run directory. The one owner of
these paths; the recipe, the training stages and the jobs' presets ask it instead of joining names.

    <run_dir>/
      base_model/                    the tiny base the toy recipe builds (a real run names an HF id)
      <stage>/                       stage1..stage5 and reranker: one training run each
        model/                       the merged model (HF dir + umarvel_*.json)
        checkpoints/                 resumable checkpoints (without Ray; Ray Train keeps its own)
        steps.jsonl                  one row per optimizer step (rank 0)
        train_summary.json           the run's summary
      ray/<stage>/                   Ray Train's own checkpoints and state (train/launch.py)
      negatives/negatives.jsonl      mined hard negatives (stage 4, reranker)
      teacher/teacher.jsonl          teacher scores (stage 5)
      eval/<name>/                   one evaluation: embeddings/, index/, runs/, mbeir.md/json
      recipe_config.yaml             the resolved recipe config
      recipe_summary.{json,md}       scores and timings of every step
"""

from __future__ import annotations

import os
from pathlib import Path

from umarvel_ray.config import RUN_DIR_TEMPLATE
from umarvel_ray.data.artefacts import NEGATIVES_FILE, TEACHER_FILE

BASE_MODEL_DIR = "base_model"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
STEPS_FILE = "steps.jsonl"
TRAIN_SUMMARY_FILE = "train_summary.json"
NEGATIVES_DIR = "negatives"
TEACHER_DIR = "teacher"
RERANKER_STAGE = "reranker"
EVAL_DIR = "eval"
RECIPE_CONFIG_FILE = "recipe_config.yaml"
RECIPE_SUMMARY = "recipe_summary"


class RunLayout:
    """Paths of one run directory (nothing is created here)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)

    def base_model(self) -> Path:
        return self.run_dir / BASE_MODEL_DIR

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def stage_model(self, stage: str) -> Path:
        return self.stage_dir(stage) / MODEL_DIR

    def negatives_dir(self, consumer: str | None = None) -> Path:
        """Stage 4's mined negatives (`negatives/`), or another consumer's own (`negatives_<consumer>/`,
        e.g. the re-ranker's, mined from each task's local pool)."""
        return self.run_dir / (NEGATIVES_DIR if consumer is None else f"{NEGATIVES_DIR}_{consumer}")

    def negatives_file(self, consumer: str | None = None) -> Path:
        return self.negatives_dir(consumer) / NEGATIVES_FILE

    def teacher_dir(self) -> Path:
        return self.run_dir / TEACHER_DIR

    def teacher_file(self) -> Path:
        return self.teacher_dir() / TEACHER_FILE

    def reranker_model(self) -> Path:
        return self.stage_model(RERANKER_STAGE)

    def eval_dir(self, name: str) -> Path:
        return self.run_dir / EVAL_DIR / name

    def recipe_config(self) -> Path:
        return self.run_dir / RECIPE_CONFIG_FILE

    def recipe_summary(self, suffix: str) -> Path:
        """`recipe_summary.json` or `.md` (suffix without the dot)."""
        return self.run_dir / f"{RECIPE_SUMMARY}.{suffix}"


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """`<run_dir>/<stage>`: a training stage's (or the reranker's) output directory."""
    return RunLayout(run_dir).stage_dir(stage)


def templated(relative: str) -> str:
    """`{run_dir}/<relative>`: a preset path the training config expands once the run dir is known."""
    return f"{RUN_DIR_TEMPLATE}/{relative}"


PRESET_NEGATIVES_FILE = templated(f"{NEGATIVES_DIR}/{NEGATIVES_FILE}")
PRESET_TEACHER_FILE = templated(f"{TEACHER_DIR}/{TEACHER_FILE}")

__all__ = [
    "CHECKPOINTS_DIR",
    "MODEL_DIR",
    "PRESET_NEGATIVES_FILE",
    "PRESET_TEACHER_FILE",
    "RunLayout",
    "STEPS_FILE",
    "TRAIN_SUMMARY_FILE",
    "stage_dir",
    "templated",
]
