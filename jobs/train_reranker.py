"""Train the U-MARVEL re-ranker (pointwise Yes/No judge, LoRA on Qwen2-VL) with Ray Train + DeepSpeed.

    python jobs/train_reranker.py --config recipe.yaml max_steps=50
    python jobs/train_reranker.py model=runs/toy/base_model run_dir=runs/toy data_root=data/toy_mbeir
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_reranker.py --config recipe.yaml

The YAML's `reranker:` section is used when present (else the whole file must hold reranker keys;
`--help` lists them). Needs the stage-3 model's mined negatives (jobs/mine_negatives.py). The merged judge goes to `<output>/model` (default
`<run_dir>/reranker/model`); a finished run is skipped, an interrupted one resumes from its last
checkpoint when submitted again with the same run_dir. Exit codes: 0 done, 2 bad config, 1 failure.
"""

from __future__ import annotations

import logging
import sys

from umarvel_ray.config import ConfigError, parse_job_args
from umarvel_ray.progress import setup_logging, summary

log = logging.getLogger("umarvel_ray.jobs.train_reranker")


def main(argv: list[str] | None = None) -> int:
    """Parse `--config FILE key=value ...`, train the re-ranker, return the exit code."""
    from umarvel_ray.train.reranker_train import RerankerTrainConfig, run_reranker_training

    setup_logging()
    try:
        cfg = parse_job_args(RerankerTrainConfig, argv, description=__doc__ or "", section="reranker")
    except (ConfigError, ValueError) as exc:
        log.error("bad config: %s", exc)
        return 2
    try:
        from umarvel_ray.runtime import ensure_ray

        ensure_ray()
        out = run_reranker_training(cfg)
        summary("train reranker", model_dir=str(out))
    except Exception:
        log.exception("reranker training failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
