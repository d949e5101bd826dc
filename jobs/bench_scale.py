"""Benchmark at pool scale, on SYNTHETIC data (it measures the system, not a model).

    python jobs/bench_scale.py --quick                 # 100k rows, both sections, < 1 min on 2 cores
    python jobs/bench_scale.py --only search           # 1M x 256: one process vs 1 and 2 shard actors
    python jobs/bench_scale.py --only bookkeeping      # the embedding driver's RSS and CPU per row

search: one process vs a `SearchService` of 1 and 2 shard actors (umarvel_ray/index/service.py)
over an on-disk embedding store of random unit vectors, fp32 and fp16 storage: build seconds,
ms per query, bytes per vector and the memory of each shard, equality with the one-process top-k
(recall 1.0), ratios, and the paper-scale extrapolation (5.6M x 3584 fp16: memory per shard,
shards per H100/H200, queries/s). Logic and method: umarvel_ray/index/scale_bench.py.

bookkeeping: the embedding driver's peak RSS and CPU per row at two row counts, with a no-cost
stand-in embedder (umarvel_ray.embed.scale_bench.measure_bookkeeping).

Goals (issue #14): 2 shard actors within 1.3x of one process's time per query at equal recall,
memory split linearly; driver RSS at 1M rows within 1.2x of 100k rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

# umarvel_ray before ray: the runtime module keeps a local Ray on loopback.
from umarvel_ray.index.scale_bench import extrapolate, format_report, quick_or_full, run_search_bench


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k rows and 200 queries (< 1 min on 2 cores)")
    p.add_argument("--only", choices=("search", "bookkeeping", "all"), default="all", help="which section")
    p.add_argument(
        "--rows", type=int, help="pool rows of the search section (default 1,000,000; quick 100,000)"
    )
    p.add_argument("--dim", type=int, help="vector dim (default 256)")
    p.add_argument("--queries", type=int, help="queries timed (default 1000; quick 200)")
    p.add_argument("--k", type=int, help="search depth (default 100)")
    p.add_argument("--dtypes", help="comma-separated storage: fp32,fp16 (default both)")
    p.add_argument("--shard-cpus", type=float, help="CPUs per shard actor (default: cores / shards)")
    p.add_argument("--workdir", help="keep the synthetic store here for reruns (default: a temp dir)")
    return p.parse_args(argv)


def search_section(args: argparse.Namespace) -> None:
    over = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "shard_cpus": args.shard_cpus,
    }
    over = {k: v for k, v in over.items() if v is not None}
    if args.dtypes:
        over["dtypes"] = tuple(args.dtypes.split(","))
    settings = quick_or_full(args.quick, **over)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        arms = run_search_bench(settings, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for line in format_report(arms, settings, extrapolate(arms, settings)):
        print(line, flush=True)


def bookkeeping_section(args: argparse.Namespace) -> None:
    from umarvel_ray.embed.scale_bench import format_table, measure_bookkeeping

    results = measure_bookkeeping(quick=args.quick)  # 100k and 1M rows (quick: 5k and 50k)
    print("embedding bookkeeping (no-cost stand-in embedder: measures the driver, not a model)", flush=True)
    print(format_table(results), flush=True)
    first, last = results[0], results[-1]
    print(
        f"ratio peak RSS {last['rows']:,}/{first['rows']:,} rows: {last['peak_rss_ratio']:.2f}x (goal <= 1.2x); "
        f"growth {last['peak_rss_mb'] - first['peak_rss_mb']:.0f} MB",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    from umarvel_ray.progress import setup_logging

    args = parse_args(argv)
    setup_logging()
    if args.only in ("search", "all"):
        search_section(args)
    if args.only in ("bookkeeping", "all"):
        bookkeeping_section(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
