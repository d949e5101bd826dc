"""Benchmark: Ray Serve with dynamic batching on vs off (same run, replicas, model), and autoscaling.

    python jobs/bench_serve.py --quick     # a smoke run of every phase (~2 min on busy 2 cores)
    python jobs/bench_serve.py             # the figures to quote (~6 min on 2 cores)

Loopback only: its own local Ray and Serve on 127.0.0.1, the tiny offline Qwen2-VL and a pool of
the toy benchmark, both built in a temp work dir. QPS and p50/p95/p99 at several concurrencies for
`/v1/embed` (one item per request) and `/v1/search` (k=10, no rerank), against two copies of the
app deployed side by side: Embedder `max_batch_size` 16 (batched) and 1 (unbatched). Prints
`ratio batched/unbatched QPS: X` per route at the concurrency with the highest batched QPS among
those where batched p99 is equal or better than unbatched p99 (or says none qualifies), then an
autoscaling run (Embedder 1 -> 2 -> 1 replicas with short delays, counts from `serve.status()`).
Every load loop stops at a request count or a time limit, whichever comes first.
The logic lives in `umarvel_ray/serve/bench.py` (its module doc says what is measured and how).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

# umarvel_ray before ray: the runtime module keeps a local Ray on loopback.
from umarvel_ray.serve.bench import quick_or_full, run_bench


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run of every phase (~1-2 min on 2 cores)")
    p.add_argument("--concurrency", help="comma-separated concurrencies (default 1,4,16,32; quick 2,16)")
    p.add_argument("--requests", type=int, help="most requests per load point (default 3000; quick 400)")
    p.add_argument("--seconds", type=float, help="most seconds per load point (default 12; quick 1.5)")
    p.add_argument("--batch-size", type=int, help="Embedder max_batch_size of the batched arm (default 16)")
    p.add_argument("--batch-wait", type=float, help="batch_wait_timeout_s of the batched arm (default 0.005)")
    p.add_argument("--pool-rows", type=int, help="pool rows embedded and indexed (default 200; quick 48)")
    p.add_argument(
        "--image-size", default=None,
        help="WxH of the query images, sent as realistic JPEGs (default 500x375), or 0 for the toy's 84x84 PNGs",
    )  # fmt: skip
    p.add_argument("--no-autoscale", action="store_true", help="skip the autoscaling run")
    p.add_argument("--workdir", help="keep the generated model, data and index here (default: a temp dir)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict:
    """BenchSettings fields the command line sets (the rest keep the preset's values)."""
    out: dict = {
        "concurrencies": tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else None,
        "requests_per_point": args.requests,
        "seconds_per_point": args.seconds,
        "batch_size": args.batch_size,
        "batch_wait_timeout_s": args.batch_wait,
        "pool_rows": args.pool_rows,
        "autoscale": False if args.no_autoscale else None,
    }
    out = {k: v for k, v in out.items() if v is not None}
    if args.image_size is not None:
        text = args.image_size.lower()
        out["image_size"] = None if text in ("0", "") else tuple(int(x) for x in text.split("x"))
    return out


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.progress import setup_logging

    args = parse_args(argv)
    setup_logging()
    settings = quick_or_full(args.quick, **overrides(args))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(settings, work)
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
