"""Sharded search at scale, measured on SYNTHETIC vectors: it measures the system, not a model.

One process (`build_index_from_embeddings` + `search_arrays` in the driver) against a
`SearchService` of 1 and 2 shard actors, over the same on-disk embedding store of random unit
vectors (seeded Gaussian, normalised; ids `syn-<row>`), for fp32 and fp16 storage (faiss Flat and
SQfp16, exact). Every arm gets the same CPUs: the process uses faiss's default threads (all
cores), each of N actors reserves cores/N CPUs and runs that many threads. Per arm:

- build seconds (read the store + add; actors already started), and resident memory the index
  added (RSS after - before, each after gc, Arrow's pool release and malloc_trim; per actor for
  the service) divided by its rows: bytes per vector, and how it splits over shards;
- search: `queries` queries at depth k in blocks of `batch_size`, after one untimed warm-up block;
  milliseconds per query;
- equality with the one-process result (ids and scores): exact factories must give the same top-k,
  so recall@k of the sharded arm against the one-process arm is 1.0.

`extrapolate` turns the measured per-vector costs into the paper's scale (5.6M x 3584, fp16):
bytes per vector = 2 x 3584 + the measured non-vector overhead per row (ids, id map), shards per
H100 (80 GB) / H200 (141 GB) at 90% of the card, and the CPU queries/s those shards would give with
the measured cost per (vector x dim) (GPU search is measured by jobs/gpu_check.sh, not here).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.procmem import settled_rss_mb

log = logging.getLogger("umarvel_ray")

PAPER_ROWS = 5_600_000
PAPER_DIM = 3584
GPUS_GB = {"H100": 80, "H200": 141}
GPU_USABLE = 0.9  # of the card left to the index (CUDA context, query and top-k buffers)


@dataclass
class ScaleSettings:
    """What one run measures (`quick` presets a < 1 min smoke run)."""

    rows: int = 1_000_000
    dim: int = 256
    queries: int = 1000
    k: int = 100
    batch_size: int = 256
    shards: tuple[int, ...] = (1, 2)
    dtypes: tuple[str, ...] = ("fp32", "fp16")
    file_rows: int = 131_072
    seed: int = 0
    shard_cpus: float | None = None  # per actor; None = this machine's cores / shards


def quick_or_full(quick: bool, **overrides: Any) -> ScaleSettings:
    base = ScaleSettings(rows=100_000, queries=200) if quick else ScaleSettings()
    return ScaleSettings(**{**base.__dict__, **overrides})


@dataclass
class Arm:
    """One measured configuration."""

    name: str
    dtype: str
    shards: int  # 0 = one process
    build_s: float
    ms_per_query: float
    index_mb: float
    shard_mb: list[float] = field(default_factory=list)
    shard_rows: list[int] = field(default_factory=list)
    same_as_single: bool | None = None
    recall_vs_single: float | None = None

    def bytes_per_vector(self, rows: int) -> float:
        return self.index_mb * 2**20 / rows


def unit_vectors(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((rows, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def write_synthetic_store(directory: Path, s: ScaleSettings) -> Path:
    """The embedding-store format of the pipeline, filled with seeded random unit vectors (chunk by
    chunk: the writer never holds more than `file_rows` rows)."""
    from umarvel_ray.store import shard_name, write_manifest, write_shard

    done = directory / "manifest.json"
    if done.is_file():
        return directory
    for i, start in enumerate(range(0, s.rows, s.file_rows)):
        n = min(s.file_rows, s.rows - start)
        rng = np.random.default_rng([s.seed, i])
        ids = [f"syn-{r}" for r in range(start, start + n)]
        write_shard(directory / shard_name(i), ids, None, unit_vectors(n, s.dim, rng))
    write_manifest(
        directory,
        {"kind": "candidate", "dim": s.dim, "rows_out": s.rows, "complete": True, "synthetic": True},
    )
    return directory


def _timed_search(
    index: Any, queries: np.ndarray, s: ScaleSettings
) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    index.search_arrays(queries[: s.batch_size], s.k, batch_size=s.batch_size)  # warm-up, untimed
    t0 = time.perf_counter()
    out = index.search_arrays(queries, s.k, batch_size=s.batch_size)
    return (time.perf_counter() - t0) * 1000 / len(queries), out


def measure_single(store: Path, queries: np.ndarray, dtype: str, s: ScaleSettings) -> tuple[Arm, Any]:
    from umarvel_ray.index.build import build_index_from_embeddings

    rss0, t0 = settled_rss_mb(), time.perf_counter()
    index = build_index_from_embeddings(store, fp16=dtype == "fp16", backend="faiss", device="cpu")
    build_s = time.perf_counter() - t0
    index_mb = settled_rss_mb() - rss0
    ms, result = _timed_search(index, queries, s)
    del index
    gc.collect()
    return Arm("one process", dtype, 0, build_s, ms, index_mb, [index_mb], [s.rows]), result


def measure_service(
    store: Path, queries: np.ndarray, dtype: str, shards: int, ref: Any, s: ScaleSettings
) -> Arm:
    from umarvel_ray.index.service import SearchService

    cpus = s.shard_cpus or max(1.0, float(os.cpu_count() or 1) / shards)
    with SearchService(shards, num_cpus=cpus, device="cpu").ready() as svc:
        t0 = time.perf_counter()  # actors started: the build alone is timed
        svc.build_from_embeddings(store, fp16=dtype == "fp16", backend="faiss")
        build_s = time.perf_counter() - t0
        ms, (scores, ids) = _timed_search(svc, queries, s)
        infos = list(svc.infos)
    ref_s, ref_i = ref
    hits = [len(set(a) & set(b)) for a, b in zip(ids.tolist(), ref_i.tolist(), strict=True)]
    return Arm(
        f"{shards} shard actor{'s' if shards > 1 else ''}",
        dtype,
        shards,
        build_s,
        ms,
        sum(i["rss_added_mb"] for i in infos),
        [i["rss_added_mb"] for i in infos],
        [i["count"] for i in infos],
        bool(np.array_equal(ids, ref_i) and np.array_equal(scores, ref_s)),
        float(np.mean(hits) / s.k),
    )


def run_search_bench(s: ScaleSettings, work: Path) -> list[Arm]:
    """Every arm of the settings, on one store written under `work` (kept for reruns)."""
    from umarvel_ray.runtime import ensure_ray

    store = write_synthetic_store(work / f"synthetic-{s.rows}x{s.dim}-seed{s.seed}", s)
    queries = unit_vectors(s.queries, s.dim, np.random.default_rng([s.seed, 10**6]))
    started = ensure_ray(include_dashboard=False)
    arms: list[Arm] = []
    try:
        for dtype in s.dtypes:
            single, ref = measure_single(store, queries, dtype, s)
            arms.append(single)
            for n in s.shards:
                arms.append(measure_service(store, queries, dtype, n, ref, s))
            del ref
    finally:
        if started:
            import ray

            ray.shutdown()
    return arms


def extrapolate(arms: list[Arm], s: ScaleSettings) -> dict[str, Any]:
    """Paper scale (5.6M x 3584 fp16) from the fp16 arms' measured per-vector costs (see module doc)."""
    fp16 = [a for a in arms if a.dtype == "fp16"] or arms
    single = next(a for a in fp16 if a.shards == 0)
    vec_bytes = 2 if single.dtype == "fp16" else 4
    overhead = max(0.0, single.bytes_per_vector(s.rows) - vec_bytes * s.dim)  # ids, id map, allocator
    per_vector = 2 * PAPER_DIM + overhead
    total_gb = PAPER_ROWS * per_vector / 1e9
    # Search cost per (stored vector x dim) on this CPU, from the one-process arm.
    ns_per_vec_dim = single.ms_per_query * 1e6 / (s.rows * s.dim)
    out: dict[str, Any] = {
        "rows": PAPER_ROWS,
        "dim": PAPER_DIM,
        "bytes_per_vector": round(per_vector, 1),
        "overhead_bytes_per_vector": round(overhead, 1),
        "total_gb": round(total_gb, 2),
        "ns_per_vector_dim_cpu": round(ns_per_vec_dim, 5),
        "gpus": {},
    }
    for gpu, gb in GPUS_GB.items():
        shards = max(1, math.ceil(total_gb / (gb * GPU_USABLE)))
        ms = ns_per_vec_dim * (PAPER_ROWS / shards) * PAPER_DIM / 1e6
        out["gpus"][gpu] = {
            "shards": shards,
            "gb_per_shard": round(total_gb / shards, 2),
            "cpu_ms_per_query_per_shard": round(ms, 1),
            "cpu_queries_per_s": round(1000 / ms, 2),
        }
    return out


def format_report(arms: list[Arm], s: ScaleSettings, extra: dict[str, Any]) -> list[str]:
    """The printed table, ratios and extrapolation (also what the README quotes)."""
    lines = [
        f"SYNTHETIC vectors ({s.rows:,} x {s.dim}, random unit Gaussian): measures the system, not a model",
        f"{s.queries} queries, k={s.k}, blocks of {s.batch_size}; {os.cpu_count()} CPUs per arm",
        f"{'arm':<18} {'dtype':<5} {'build s':>8} {'ms/query':>9} {'index MB':>9} {'B/vector':>9} "
        f"{'MB per shard':>16} {'== single':>9} {'recall':>6}",
    ]
    for a in arms:
        per_shard = "/".join(f"{m:.0f}" for m in a.shard_mb)
        same = "-" if a.same_as_single is None else ("yes" if a.same_as_single else "NO")
        recall = "-" if a.recall_vs_single is None else f"{a.recall_vs_single:.4f}"
        lines.append(
            f"{a.name:<18} {a.dtype:<5} {a.build_s:>8.2f} {a.ms_per_query:>9.3f} {a.index_mb:>9.0f} "
            f"{a.bytes_per_vector(s.rows):>9.1f} {per_shard:>16} {same:>9} {recall:>6}"
        )
    for dtype in s.dtypes:
        one = next((a for a in arms if a.dtype == dtype and a.shards == 0), None)
        for a in arms:
            if one is None or a.dtype != dtype or a.shards == 0:
                continue
            split = max(a.shard_mb) / (one.index_mb / a.shards) if one.index_mb > 0 else float("nan")
            lines.append(
                f"ratio {dtype} {a.shards}-shard/one-process: time per query {a.ms_per_query / one.ms_per_query:.2f}x "
                f"(goal <= 1.3x for 2), build {a.build_s / one.build_s:.2f}x, "
                f"largest shard memory / (one process / {a.shards}) {split:.2f}"
            )
    e = extra
    lines.append(
        f"paper scale (extrapolated): {e['rows']:,} x {e['dim']} fp16 = {e['bytes_per_vector']} B/vector "
        f"({e['overhead_bytes_per_vector']} B measured overhead) = {e['total_gb']} GB"
    )
    for gpu, g in e["gpus"].items():
        lines.append(
            f"  {gpu} ({GPUS_GB[gpu]} GB, {GPU_USABLE:.0%} usable): {g['shards']} shard(s) of {g['gb_per_shard']} GB; "
            f"CPU-measured cost would give {g['cpu_ms_per_query_per_shard']} ms/query per shard = "
            f"{g['cpu_queries_per_s']} queries/s (GPU search: jobs/gpu_check.sh)"
        )
    return lines
