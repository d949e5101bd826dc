"""Run the whole U-MARVEL recipe end to end (data, training chain, mining, teacher, evaluation).

    python jobs/pipeline.py --config jobs/configs/toy.yaml                  # laptop: local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/paper_qwen2vl7b.yaml run_dir=/mnt/runs/x

Every step skips work already done, so resubmitting after a failure carries on where it stopped.
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import logging
import sys

from umarvel_ray.config import ConfigError, parse_job_args
from umarvel_ray.progress import setup_logging

log = logging.getLogger("umarvel_ray.jobs.pipeline")


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.recipe import RecipeConfig, run_recipe
    from umarvel_ray.runtime import ensure_ray

    setup_logging()
    try:
        cfg = parse_job_args(RecipeConfig, argv, description=__doc__ or "")
    except (ConfigError, ValueError) as exc:
        log.error("bad config: %s", exc)
        return 2
    try:
        ensure_ray()
        run_recipe(cfg)
    except Exception:
        log.exception("pipeline failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
