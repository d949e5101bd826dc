"""Run the whole U-MARVEL recipe end to end (data, training chain, mining, teacher, evaluation).

    python jobs/recipe.py --config jobs/configs/toy.yaml                  # laptop: local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/recipe.py --config jobs/configs/paper_qwen2vl7b.yaml run_dir=/mnt/runs/x

Every step skips work already done, so resubmitting after a failure carries on where it stopped.
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.recipe import RecipeConfig, run_recipe

    return run_job(RecipeConfig, run_recipe, argv, __doc__, needs_ray=True)


if __name__ == "__main__":
    sys.exit(main())
