"""Refuse a training stage whose input files are not there, before Ray or DeepSpeed start.

Stages 1-2 (progressive transition, RECIPE.md section 3) train on external pairs the paper takes
from SimCSE's NLI set and CC3M; only the toy generator writes them. A directory of one's own
usually has none, so the message says which file to provide, in what format, and how to start the
chain at stage 3 instead. Stages 3-5 need the union train file or per-task train files.
"""

from __future__ import annotations

from pathlib import Path

from umarvel_ray.config import ConfigError
from umarvel_ray.train.stages import STAGE_ORDER, TrainConfig

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
    return ",".join(s for s in STAGE_ORDER[STAGE_ORDER.index("stage3") :])


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


__all__ = ["PAIR_FORMATS", "check_stage_inputs"]
