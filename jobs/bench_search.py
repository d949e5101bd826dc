"""Exact top-k search on GPU (torch index) vs on CPU (faiss-cpu when importable, else torch on CPU).

    python jobs/bench_search.py --device cuda                 # 1M x 256 fp32, 4096 queries, k=10
    python jobs/bench_search.py --vectors 20000 --dim 64 --queries 256 --device cpu   # smoke run

Synthetic vectors (seeded Gaussian, L2-normalised): this measures the search system, not a model.
Both arms are exact inner-product search through `umarvel_ray.index.build_index` ("Flat"); the
GPU arm must return the CPU arm's ids (`agreement` = fraction of queries whose top-k id lists are
equal; near-ties in fp32 may swap, so the check asks >= 0.99). Prints build and search times,
queries/s of each arm and their ratio; `--json` writes them. The CPU arm says which backend ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=1_000_000, help="pool size")
    p.add_argument("--dim", type=int, default=256, help="vector dimension")
    p.add_argument("--queries", type=int, default=4096, help="queries searched (timed)")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--device", default="cuda", help="device of the accelerated arm: cuda (or cpu for a smoke run)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def synthetic(n: int, dim: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool [n, dim], ids [n], queries [nq, dim]), float32, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n, dim), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = rng.standard_normal((nq, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return pool, np.array([f"v{i}" for i in range(n)], dtype=object), queries


def cpu_backend() -> str:
    from umarvel_ray.index.faiss_index import faiss_available

    return "faiss" if faiss_available() else "torch"


def timed_arm(pool: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, backend: str, device: str) -> dict:
    """Build + one warm-up search + the timed search of every query."""
    import torch

    from umarvel_ray.index import build_index

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t = time.perf_counter()
    index = build_index(pool, ids, factory="Flat", backend=backend, device=device)
    sync()
    build_s = time.perf_counter() - t
    index.search_arrays(queries[:64], k)
    sync()
    t = time.perf_counter()
    _, found = index.search_arrays(queries, k)
    sync()
    search_s = time.perf_counter() - t
    return {"backend": backend, "device": device, "build_s": build_s, "search_s": search_s,
            "queries_per_s": len(queries) / search_s, "ids": found}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    pool, ids, queries = synthetic(args.vectors, args.dim, args.queries)
    cpu = timed_arm(pool, ids, queries, args.k, cpu_backend(), "cpu")
    acc = timed_arm(pool, ids, queries, args.k, "torch", args.device)
    agreement = float(np.mean([list(a) == list(c) for a, c in zip(acc.pop("ids"), cpu.pop("ids"), strict=True)]))
    return {
        "vectors": args.vectors, "dim": args.dim, "queries": args.queries, "k": args.k,
        "data": "synthetic Gaussian (measures the search system, not a model)",
        "accelerated": acc, "cpu": cpu, "agreement": agreement,
        "speedup": acc["queries_per_s"] / cpu["queries_per_s"],
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    r = run(args)
    print(f"{r['vectors']} x {r['dim']} fp32 ({r['data']}), {r['queries']} queries, k={r['k']}")
    for name in ("accelerated", "cpu"):
        a = r[name]
        print(
            f"  {name:<11} {a['backend']:<5} on {a['device']:<4}: build {a['build_s']:.2f}s, "
            f"search {a['search_s']:.3f}s = {a['queries_per_s']:.0f} queries/s"
        )
    print(f"speedup {r['speedup']:.1f}x; top-{r['k']} ids equal on {r['agreement']:.2%} of queries")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
