"""Refuse a training stage whose input files are not there, before Ray or DeepSpeed start.

Stages 1-2 (progressive transition, docs/RECIPE.md section 3) train on external pairs the paper takes
from SimCSE's NLI set and CC3M; only the toy generator writes them. A directory of one's own
usually has none, so the message says which file to provide, in what format, and how to start the
chain at stage 3 instead. Stages 3-5 need the union train file or per-task train files.
"""

from __future__ import annotations

from pathlib import Path

from umarvel_ray.config import ConfigError
from umarvel_ray.train.config import DEFAULT_STAGES, TrainConfig

PAIR_FORMATS = {
    "nli": (
        "one json object a line: {\"sent0\": \"a sentence\", \"sent1\": \"a sentence that entails it\", "
        "\"hard_neg\": \"a contradicting sentence\"} (SimCSE's NLI triplets; hard_neg needed when "
        "num_negatives=1)"
    ),
    "caption": (
        "one json object a line: {\"caption\": \"a caption\", \"img_path\": \"image path relative to "
        "data_root\"} (image-caption pairs such as CC3M)"
    ),
}


def _later_stages() -> str:
    return ",".join(s for s in DEFAULT_STAGES[DEFAULT_STAGES.index("stage3") :])


def check_stage_inputs(cfg: TrainConfig) -> None:
    """ConfigError, in the user's terms, when a stage's training data cannot be found."""
    train = cfg.data_path(cfg.train_file)
    if cfg.data_kind in PAIR_FORMATS:
        if train.is_file():
            return
        raise ConfigError(
            f"{cfg.stage} ({cfg.data_kind} pairs) needs {train}, which does not exist. Either provide it "
            f"({PAIR_FORMATS[cfg.data_kind]}), point {cfg.stage}.train_file= at such a file, or start "
            f"the chain at stage 3 without the progressive-transition stages: "
            f"stages=[{_later_stages()}] (stage3 then trains from model=)"
        )
    if cfg.data_kind in ("mbeir", "distill") and not train.is_file():
        from umarvel_ray.data.mbeir import TRAIN_QUERY_FILE
        from umarvel_ray.data.tasks import train_query_files

        root = Path(cfg.data_root or ".")
        if train.resolve() != (root / TRAIN_QUERY_FILE).resolve():
            raise ConfigError(f"{cfg.stage}: train_file not found: {train}")
        if not train_query_files(root):
            raise ConfigError(
                f"{cfg.stage} needs training queries: {train} does not exist and {root}/query/train/ "
                "has no mbeir_<dataset>_task<N>_train.jsonl files (jobs/import_data.py writes them)"
            )


def check_between_stage_files(cfg: TrainConfig) -> None:
    """ConfigError when stage 4's mined negatives or stage 5's teacher scores are not there yet.

    Training does not write them: `jobs/mine_negatives.py` and `jobs/teacher_scores.py` do, from the
    previous stage's model, and `jobs/recipe.py` runs them between the stages. `jobs/train.py`
    calls this for every stage it will train, so `stages=[stage3,stage4,stage5]` stops before
    stage 3 instead of failing inside stage 4's workers; a finished stage is not checked (it is
    skipped). The recipe does not call it (it writes these files itself).
    """
    from umarvel_ray.train.launch import stage_done

    if cfg.data_kind == "mbeir" and cfg.num_negatives > 0 and cfg.negatives_file:
        key, job = "negatives_file", "jobs/mine_negatives.py (hard negatives from the stage-3 model)"
    elif cfg.data_kind == "distill" and cfg.teacher_file:
        key, job = "teacher_file", "jobs/teacher_scores.py (teacher scores from the stage-4 model and the reranker)"
    else:
        return
    path = cfg.data_path(getattr(cfg, key))
    if path.is_file() or stage_done(cfg):
        return
    raise ConfigError(
        f"{cfg.stage} trains on {path} ({cfg.stage}.{key}), which does not exist yet: {job} writes it. "
        f"Run that job first and then this stage, or run the chain with jobs/recipe.py "
        f"'train.stages=[...]', which runs it between the stages"
    )


__all__ = ["PAIR_FORMATS", "check_between_stage_files", "check_stage_inputs"]
