"""Mine stage-4 hard negatives (U-MARVEL first-5 rule, or MM-Embed's modality-aware sampling).

    python jobs/mine_negatives.py --config jobs/configs/X.yaml data_root=... model=runs/r/stage3/model \
        output_dir=runs/r/negatives
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/mine_negatives.py --config ...

Options: strategy=mmembed, max_score=0.7 (false-negative filter), margin=0.05 (drop candidates scoring
above the positive - margin, NV-Retriever), depth=100, num_negatives=5,
embed.batch_size=..., query_embeddings=/pool_embeddings= to reuse embedding directories.
Rerunning resumes the embedding shards; search and selection are repeated (deterministic).
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.mine.run import run_mining


def main(argv: list[str] | None = None) -> int:
    return run_job(MineConfig, lambda cfg: print(run_mining(cfg).summary, flush=True), argv, __doc__, "mine")


if __name__ == "__main__":
    sys.exit(main())
