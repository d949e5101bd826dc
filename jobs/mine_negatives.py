"""Mine stage-4 hard negatives (U-MARVEL first-5 rule, or MM-Embed's modality-aware sampling).

    python jobs/mine_negatives.py --config jobs/configs/X.yaml data_root=... model=runs/r/stage3/model \
        output_dir=runs/r/negatives
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/mine_negatives.py --config ...

Options: strategy=mmembed, max_score=0.7 (false-negative filter), depth=100, num_negatives=5,
embed.batch_size=..., query_embeddings=/pool_embeddings= to reuse embedding directories.
Rerunning resumes the embedding shards; search and selection are repeated (deterministic).
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import logging
import sys

from umarvel_ray.config import ConfigError, parse_job_args
from umarvel_ray.pipelines.mine import MineConfig, run_mining
from umarvel_ray.progress import setup_logging

log = logging.getLogger("umarvel_ray.jobs.mine_negatives")


def main(argv: list[str] | None = None) -> int:
    """Parse `--config FILE key=value ...`, run mining, return the exit code."""
    setup_logging()
    try:
        cfg = parse_job_args(MineConfig, argv, description=__doc__ or "", section="mine")
        result = run_mining(cfg)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    print(result.summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
