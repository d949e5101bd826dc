"""Stage 5's teacher gate: distil only from a teacher that ranks better than the student already does.

KL distillation pulls the student's ranking toward the teacher's (model/losses.kl_distill). When
the teacher's cos + w * P(Yes) ranks the labelled positives no better than cos alone (an
uninformative re-ranker), its target is the student's own ranking made flatter by the 2 tau
temperature, and training on it lowers retrieval. The teacher step writes its quality beside
teacher.jsonl (teacher_quality.json, teacher/quality.py); this reads it before any worker starts.
A skipped stage keeps its starting model: `<stage>/model` holds hard links to that model's files
(a copy where the filesystem cannot link), so the chain after it and a restart see a finished stage,
and `train_summary.json` says `skipped` and why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError
from umarvel_ray.io import atomic_write_text
from umarvel_ray.layout import TRAIN_SUMMARY_FILE
from umarvel_ray.train.config import TrainConfig

log = logging.getLogger(__name__)


def gate_reason(cfg: TrainConfig) -> str | None:
    """Why a distillation stage must not train (None: train), from the teacher's quality record.

    Raises ConfigError when the gate is on and the teacher has no quality record (a teacher.jsonl
    written by hand or by an older version): rerun the teacher step, or set teacher_gate=false.
    """
    from umarvel_ray.data.artefacts import read_teacher_quality

    if cfg.objective != "distill" or not cfg.teacher_gate:
        return None
    teacher = cfg.data_path(cfg.teacher_file)
    quality = read_teacher_quality(teacher)
    if quality is None:
        raise ConfigError(
            f"{cfg.stage}: the teacher {teacher} has no teacher_quality.json beside it, so the gate cannot "
            f"tell whether it beats cos; rerun jobs/teacher_scores.py, or set {cfg.stage}.teacher_gate=false"
        )
    fused, cos = quality["fused"]["mrr"], quality["cos"]["mrr"]
    which = "held-out" if quality.get("held_out") else "trained-on"
    if quality.get("fusion_beats_cos"):
        log.info(
            "%s: teacher gate passed: fused MRR %.4f > cos MRR %.4f on %d %s queries",
            cfg.stage, fused, cos, quality["queries"], which,
        )  # fmt: skip
        return None
    return (
        f"the teacher's fused ranking does not beat cos alone (MRR@K {fused:.4f} vs {cos:.4f} on "
        f"{quality['queries']} {which} queries), so distilling it could only flatten the model's ranking"
    )


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` = `src`'s files as hard links (copies across filesystems), renamed into place at the end."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a: str, b: str) -> Any:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)


def skip_stage(cfg: TrainConfig, reason: str) -> Path:
    """Finish `cfg`'s stage without training: its model is its starting model; returns the model dir.

    Raises ConfigError when the starting model is not a local directory (a hub id cannot be linked).
    """
    start = Path(cfg.model)
    if not (start / "config.json").is_file():
        raise ConfigError(f"{cfg.stage}: cannot skip: the starting model {start} is not a local model directory")
    log.warning("%s skipped: %s; its model is its starting model %s", cfg.stage, reason, start)
    cfg.stage_dir.mkdir(parents=True, exist_ok=True)
    if not (cfg.model_dir / "config.json").is_file():
        _link_tree(start, cfg.model_dir)
    summary = {"stage": cfg.stage, "skipped": reason, "model_dir": str(cfg.model_dir), "start_model": str(start)}
    atomic_write_text(cfg.stage_dir / TRAIN_SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return cfg.model_dir


def skipped_reason(stage_dir: Path) -> str | None:
    """The `skipped` reason a finished stage recorded, or None when it trained."""
    from umarvel_ray.io import read_json_or_none

    summary = read_json_or_none(stage_dir / TRAIN_SUMMARY_FILE) or {}
    return summary.get("skipped")
