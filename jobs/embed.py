"""Embed an M-BEIR candidate pool or query file into parquet shards (Ray Data).

    python jobs/embed.py data_root=/data/mbeir input=cand_pool/global/mbeir_union_test_cand_pool.jsonl \
        model=runs/x/stage5/model output_dir=runs/x/embeddings/union kind=candidate
    python jobs/embed.py --config CFG.yaml kind=query input=query/test/... prompt_index=0
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/embed.py --config CFG.yaml

Rerunning the same command resumes: finished shards are verified and skipped.
Exit codes: 0 done, 2 bad config, 1 any other failure.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.embed.run import run_embedding


def main(argv: list[str] | None = None) -> int:
    return run_job(EmbedConfig, lambda cfg: print(run_embedding(cfg).summary, flush=True), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
