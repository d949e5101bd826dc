"""Build and save a retrieval index from an embedding directory (part-*.parquet + manifest.json).

    python jobs/build_index.py embeddings=runs/emb/pool-global output=runs/index/global
    python jobs/build_index.py embeddings=... output=... factory=IVF4096,Flat nprobe=64
    python jobs/build_index.py embeddings=runs/eval/embeddings/pool-global output=runs/index/coco \\
        subset_pool=/data/M-BEIR/cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl

Writes <output>.faiss (or the torch backend's files), <output>.ids.npy, <output>.meta.json and the
resolved config next to them. `subset_pool` keeps only the ids of that pool file (a local index cut
out of the global embeddings, as jobs/evaluate.py does). Exit codes: 0 done, 2 bad config, 1 other.
The logic is `umarvel_ray.index.build.run_build_index`.
"""

from __future__ import annotations

import sys

from umarvel_ray.cli import run_job
from umarvel_ray.index.build import BuildIndexConfig, check_build_config, run_build_index


def main(argv: list[str] | None = None) -> int:
    return run_job(
        BuildIndexConfig, lambda cfg: print(run_build_index(cfg), flush=True), argv, __doc__, check=check_build_config
    )


if __name__ == "__main__":
    sys.exit(main())
