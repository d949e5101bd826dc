"""Driver peak RSS and per-row CPU of the embedding bookkeeping at growing pool sizes.

A SYSTEM benchmark, not a model benchmark: the model stage is `StandInEmbedder`, a no-cost
deterministic stand-in (vector = one-hot of the input line number), so what is measured is the
rest of the real pipeline, unchanged: `run_embedding`'s input index, the Ray Data decode tasks
and actor pool, `iter_batches` into the driver, `ShardCommitter` (buffers, duplicate checks
against `CommittedIds`, parquet + rejects + progress writes) and the final manifest. The input is
a synthetic text-only M-BEIR candidate pool ("<d>:<n>" ids) with one planted duplicate id per
1,000 rows, so the duplicate path is exercised and checked (rows in = out + rejected).

Each size runs in a fresh subprocess (its own local Ray, shut down at the end), so the driver's
`peak_rss_mb` (VmHWM) is that size's peak alone. Reported per size: `peak_rss_mb` (driver peak),
`base_rss_mb` (the same process just before `run_embedding`: imports and Ray start),
`end_rss_mb` (after it), `peak_buffered_rows` (rows the driver held at once in incomplete
shards),
`cpu_us_per_row` (driver process CPU, all threads, over `run_embedding`), `bookkeeping_us_per_row`
(the committer alone, driver main thread), wall seconds and row counts.

    python -m umarvel_ray.embed.scale_bench [--quick] [--rows 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.embed.actor import EmbedActor
from umarvel_ray.embed.config import EmbedConfig, model_dim
from umarvel_ray.embed.run import run_embedding
from umarvel_ray.procmem import peak_rss_mb, rss_mb

DEFAULT_ROWS = (100_000, 1_000_000)
QUICK_ROWS = (5_000, 50_000)
DUPLICATE_EVERY = 1000
RESULT_TAG = "SCALE_BENCH_RESULT "
MODULE = "umarvel_ray.embed.scale_bench"


class StandInEmbedder(EmbedActor):
    """NOT A MODEL: a no-cost stand-in for `EmbedActor`'s forward pass (benchmarks of the pipeline).

    Same constructor and batch contract; `__call__` (unpacking groups, rejects, output columns) is
    the real one. Row vector = one-hot of its input line modulo the model's dim; no weights load.
    """

    def __init__(self, model: str, kind: str, **_: Any) -> None:
        self.is_query = kind == "query"
        self.dim = model_dim(Path(model))

    def _from_items(
        self, items: list[dict[str, Any]], meta: dict[str, np.ndarray], ok: np.ndarray
    ) -> np.ndarray:
        out = np.zeros((len(ok), self.dim), np.float32)
        out[np.arange(len(ok)), np.asarray(meta["line"])[ok] % self.dim] = 1.0
        return out

    def _from_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise RuntimeError("StandInEmbedder runs with collate_in=actor (no tokenizer work at all)")


def write_synthetic_pool(path: Path, rows: int) -> int:
    """A text-only candidate jsonl of `rows` rows; returns the number of planted duplicate ids."""
    planted = 0
    with path.open("w") as f:
        for start in range(0, rows, 10_000):
            lines = []
            for i in range(start, min(rows, start + 10_000)):
                n = i - 500 if i % DUPLICATE_EVERY == 999 and i >= 500 else i  # repeats row i-500's id
                planted += n != i
                did = f"{n % 9 + 1}:{n}"
                lines.append(
                    f'{{"did": "{did}", "txt": "synthetic row {n}", "img_path": null, "modality": "text"}}\n'
                )
            f.write("".join(lines))
    return planted


def measure_one(rows: int, workdir: Path, model_dir: Path) -> dict[str, Any]:
    """One size in this process (call it in a fresh one: peak RSS is per process)."""
    import ray

    from umarvel_ray.runtime import ensure_ray

    pool = workdir / f"pool-{rows}.jsonl"
    planted = write_synthetic_pool(pool, rows)
    started = ensure_ray(
        num_cpus=os.cpu_count() or 2, object_store_memory=512 * 1024**2, include_dashboard=False
    )
    try:
        cfg = EmbedConfig(
            input=str(pool),
            data_root=str(workdir),
            model=str(model_dir),
            output_dir=str(workdir / f"emb-{rows}"),
            collate_in="actor",
            batch_size=256,
            chunk_rows=1000,
            actor_num_cpus=0.5,
            decode_num_cpus=0.5,
            progress_every_s=30.0,
            overwrite=True,
        )
        base = peak_rss_mb()
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = run_embedding(cfg, embed_stage=StandInEmbedder)
        ru1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        end_rss = rss_mb()
    finally:
        if started:
            ray.shutdown()
    if (result.rows_in, result.rows_rejected) != (rows, planted) or result.rows_out != rows - planted:
        raise RuntimeError(f"accounting: {result.summary} (planted {planted} duplicates)")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "rows": rows,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "base_rss_mb": round(base, 1),
        "cpu_us_per_row": round(cpu / rows * 1e6, 2),
        "bookkeeping_us_per_row": round(result.bookkeeping_cpu_s / rows * 1e6, 2),
        "end_rss_mb": round(end_rss, 1),
        "peak_buffered_rows": result.peak_buffered_rows,
        "wall_s": round(wall, 1),
        "rows_out": result.rows_out,
        "rows_rejected": result.rows_rejected,
        "embedder": "stand-in (no model)",
    }


def measure_bookkeeping(
    rows: list[int] | None = None, quick: bool = False, workdir: str | None = None
) -> list[dict]:
    """Each size of `rows` (default 100k and 1M; quick: 5k and 50k) in a fresh subprocess.

    Adds `peak_rss_ratio`: peak RSS over the first size's. Raises if a size's run fails.
    """
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    sizes = list(rows) if rows else list(QUICK_ROWS if quick else DEFAULT_ROWS)
    with tempfile.TemporaryDirectory(prefix="scale_bench_", dir=workdir) as tmp:
        work = Path(tmp)
        model_dir = make_tiny_qwen2vl(work / "model", seed=0)  # dim and pixel budget only
        out = []
        for n in sizes:
            # Imported by its module name (not run as __main__): Ray workers unpickle the stand-in by name.
            child = f"from {MODULE} import main; main({['--one', str(n), '--workdir', tmp, '--model', str(model_dir)]!r})"
            cmd = [sys.executable, "-c", child]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            tagged = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
            if proc.returncode or not tagged:
                raise RuntimeError(
                    f"scale bench at {n} rows failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
                )
            out.append(json.loads(tagged[-1][len(RESULT_TAG) :]))
    for r in out:
        r["peak_rss_ratio"] = round(r["peak_rss_mb"] / out[0]["peak_rss_mb"], 3)
    return out


def format_table(results: list[dict]) -> str:
    """The results as aligned text lines (one per size)."""
    head = (
        "rows        peak_rss_mb  ratio  base_rss_mb  end_rss_mb  peak_buffered"
        "  cpu_us/row  bookkeeping_us/row  wall_s  (stand-in embedder)"
    )
    lines = [head]
    for r in results:
        lines.append(
            f"{r['rows']:<11d} {r['peak_rss_mb']:>11.1f}  {r['peak_rss_ratio']:>5.3f}  {r['base_rss_mb']:>11.1f}"
            f"  {r['end_rss_mb']:>10.1f}  {r['peak_buffered_rows']:>13d}"
            f"  {r['cpu_us_per_row']:>10.2f}  {r['bookkeeping_us_per_row']:>18.2f}  {r['wall_s']:>6.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_ROWS} instead of {DEFAULT_ROWS}")
    p.add_argument("--rows", help="comma-separated sizes")
    p.add_argument("--workdir", help="parent of the temp work dir (default: the system temp dir)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        result = measure_one(args.one, Path(args.workdir), Path(args.model))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    rows = [int(r) for r in args.rows.split(",")] if args.rows else None
    print(format_table(measure_bookkeeping(rows, quick=args.quick, workdir=args.workdir)))


if __name__ == "__main__":
    main()
