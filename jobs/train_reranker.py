"""Train the U-MARVEL re-ranker (pointwise Yes/No judge, LoRA on Qwen2-VL) with Ray Train + DeepSpeed.

    python jobs/train_reranker.py --config recipe.yaml max_steps=50
    python jobs/train_reranker.py model=runs/toy/base_model run_dir=runs/toy data_root=data/toy_mbeir
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_reranker.py --config recipe.yaml

The YAML's `reranker:` section is used when present (else the whole file must hold reranker keys;
`--help` lists them). Needs the stage-3 model's mined negatives (jobs/mine_negatives.py). The merged judge goes to `<output>/model` (default
`<run_dir>/reranker/model`); a finished run is skipped, an interrupted one resumes from its last
checkpoint when submitted again with the same run_dir. With holdout_fraction > 0 the SUMMARY line
carries the held-out pairwise accuracy and mean P(Yes) of positives / negatives. Exit codes: 0 done, 2 bad config, 1 failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from umarvel_ray.cli import run_job
from umarvel_ray.progress import summary


def _train(cfg: object) -> Path:
    from umarvel_ray.layout import TRAIN_SUMMARY_FILE
    from umarvel_ray.train.launch import run_reranker_training
    from umarvel_ray.train.reranker_heldout import summary_fields

    out = run_reranker_training(cfg)
    summary("train reranker", model_dir=str(out), **summary_fields(cfg.stage_dir / TRAIN_SUMMARY_FILE))
    return out


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.train.reranker import RerankerTrainConfig, check_reranker_inputs

    return run_job(
        RerankerTrainConfig, _train, argv, __doc__, "reranker", needs_ray=True, check=check_reranker_inputs
    )


if __name__ == "__main__":
    sys.exit(main())
