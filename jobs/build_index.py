"""Build and save a retrieval index from an embedding directory (part-*.parquet + manifest.json).

    python jobs/build_index.py embeddings=runs/emb/pool-global output=runs/index/global
    python jobs/build_index.py embeddings=... output=... factory=IVF4096,Flat nprobe=64
    python jobs/build_index.py embeddings=runs/eval/embeddings/pool-global output=runs/index/coco \\
        subset_pool=/data/M-BEIR/cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl

Writes <output>.faiss (or the torch backend's files), <output>.ids.npy, <output>.meta.json and the
resolved config next to them. `subset_pool` keeps only the ids of that pool file (a local index cut
out of the global embeddings, as jobs/evaluate.py does). Exit codes: 0 done, 2 bad config, 1 other.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from umarvel_ray.config import ConfigError, parse_job_args, save_config
from umarvel_ray.index.factory import RULE
from umarvel_ray.progress import setup_logging, summary

log = logging.getLogger("umarvel_ray.jobs.build_index")


@dataclass
class BuildIndexConfig:
    """Settings of `jobs/build_index.py`."""

    embeddings: str = field(default="", metadata={"path": "cwd", "help": "embedding directory (part-*.parquet)"})
    output: str = field(default="", metadata={"path": "cwd", "help": "index base path (<output>.faiss, .meta.json, ...)"})
    factory: str = field(
        default="Flat", metadata={"help": f"faiss factory string; Flat = exact. Pool-size rule: {RULE}"}
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 vector storage"})
    backend: str = field(default="auto", metadata={"help": "auto | faiss | torch"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    nprobe: int | None = field(default=None, metadata={"help": "IVF nprobe saved with the index"})
    train_rows: int = field(default=100_000, metadata={"help": "training sample for IVF/PQ factories"})
    seed: int = field(default=0, metadata={"help": "seed of the training sample"})
    subset_pool: str | None = field(
        default=None, metadata={"path": "cwd", "help": "pool jsonl: index only the ids it lists (all must be present)"}
    )


def main(argv: list[str] | None = None) -> int:
    """Parse `--config FILE key=value ...`, build the index, save it, print a SUMMARY line."""
    setup_logging()
    try:
        cfg = parse_job_args(BuildIndexConfig, argv, description=__doc__ or "")
        if not cfg.embeddings or not cfg.output:
            raise ConfigError("embeddings=... and output=... are required")
        if not Path(cfg.embeddings).is_dir():
            raise ConfigError(f"embedding directory not found: {cfg.embeddings}")
        if cfg.subset_pool and not Path(cfg.subset_pool).is_file():
            raise ConfigError(f"subset_pool file not found: {cfg.subset_pool}")
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    from umarvel_ray.eval.plan import read_dids
    from umarvel_ray.index import build_index, build_index_from_embeddings
    from umarvel_ray.store import PoolEmbeddings

    t0 = time.perf_counter()
    opts = dict(
        factory=cfg.factory,
        fp16=cfg.fp16,
        device=cfg.device,
        backend=cfg.backend,
        nprobe=cfg.nprobe,
        train_rows=cfg.train_rows,
        seed=cfg.seed,
    )
    if cfg.subset_pool:
        wanted = read_dids(Path(cfg.subset_pool))
        ids, vectors = PoolEmbeddings(Path(cfg.embeddings)).subset(wanted)
        if len(ids) != len(wanted):
            log.error("%d ids of %s are not in %s", len(wanted) - len(ids), cfg.subset_pool, cfg.embeddings)
            return 1
        index = build_index(vectors, ids, **opts)
    else:
        index = build_index_from_embeddings(cfg.embeddings, **opts)
    out = index.save(cfg.output)
    save_config(cfg, out.parent, name=f"{out.name}.config.yaml")
    print(
        summary(
            "build_index",
            rows=len(index),
            dim=index.dim,
            backend=index.backend,
            factory=getattr(index, "factory", ""),
            output=str(out),
            seconds=f"{time.perf_counter() - t0:.1f}",
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
