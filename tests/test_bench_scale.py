"""jobs/bench_scale.py's search section on a small synthetic store (the bookkeeping section belongs
to the embedding pipeline's bench and is tested with it)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def test_scale_bench_search_section(ray_cluster, tmp_path, capsys):
    """The bench's search arms on a small synthetic store: sharded == one process, memory split."""
    import importlib.util

    from umarvel_ray.index.scale_bench import ScaleSettings, extrapolate, run_search_bench

    s = ScaleSettings(rows=3000, dim=16, queries=40, k=20, batch_size=16, file_rows=700, shard_cpus=0.5)
    arms = run_search_bench(s, tmp_path)
    assert [(a.dtype, a.shards) for a in arms] == [
        ("fp32", 0),
        ("fp32", 1),
        ("fp32", 2),
        ("fp16", 0),
        ("fp16", 1),
        ("fp16", 2),
    ]
    for a in arms:
        assert sum(a.shard_rows) == 3000 and a.ms_per_query > 0 and a.build_s > 0
        if a.shards:
            assert a.same_as_single is True and a.recall_vs_single == 1.0
    assert [a.shard_rows for a in arms if a.shards == 2] == [[1500, 1500]] * 2
    e = extrapolate(arms, s)
    assert e["bytes_per_vector"] >= 2 * 3584 and e["total_gb"] >= round(5.6e6 * 7168 / 1e9, 2)
    assert e["gpus"]["H100"]["shards"] >= e["gpus"]["H200"]["shards"] >= 1
    assert e["gpus"]["H100"]["gb_per_shard"] <= 80 * 0.9
    # The job: parses, runs the search section only, prints the labelled table and the ratios.
    spec = importlib.util.spec_from_file_location(
        "job_bench_scale", Path(__file__).parents[1] / "jobs" / "bench_scale.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [
        "--only",
        "search",
        "--rows",
        "2000",
        "--dim",
        "8",
        "--queries",
        "20",
        "--k",
        "5",
        "--shard-cpus",
        "0.5",
    ]
    assert job.main(argv + ["--dtypes", "fp32", "--workdir", str(tmp_path / "job")]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC vectors (2,000 x 8" in out and "ratio fp32 2-shard/one-process" in out
    assert "H200 (141 GB" in out and " NO " not in out
