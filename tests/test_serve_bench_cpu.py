"""The serving bench's CPU split: process roles from Ray's titles, per-request arithmetic, the
Amdahl bound, and /proc reading of real processes titled like Serve's."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from umarvel_ray.serve import bench_cpu
from umarvel_ray.serve.bench_report import ceiling_line


def test_roles_from_titles():
    assert bench_cpu.role_of("ray::ProxyActor", "a") == "proxy"
    assert bench_cpu.role_of("ray::ServeReplica:bench_batched:Embedder", "bench_batched") == "Embedder"
    assert bench_cpu.role_of("ray::ServeReplica:bench_batched:Retriever", "bench_batched") == "Retriever"
    busy = "ray::ServeReplica:bench_batched:Embedder.handle_request_with_rejection"
    assert bench_cpu.role_of(busy, "bench_batched") == "Embedder"
    # another app's replicas, an app whose name extends this one's, and other Ray processes
    assert bench_cpu.role_of("ray::ServeReplica:bench_unbatched:Embedder", "bench_batched") is None
    assert bench_cpu.role_of("ray::ServeReplica:bench_batched2:Embedder", "bench_batched") is None
    assert bench_cpu.role_of("ray::ServeController", "bench_batched") is None
    assert bench_cpu.role_of("/usr/bin/python", "bench_batched") is None


def test_per_request_and_ceiling_arithmetic():
    before = {"proxy": 1.0, "Embedder": 2.0, "Retriever": 0.5, "client": 3.0}
    after = {"proxy": 1.6, "Embedder": 2.65, "Retriever": 1.3, "client": 3.1, "new": 9.0}
    ms = bench_cpu.per_request_ms(before, after, 100)
    assert ms == {"proxy": 6.0, "Embedder": 6.5, "Retriever": 8.0, "client": 1.0}
    assert bench_cpu.per_request_ms(before, after, 0) == {}
    bound = bench_cpu.batching_ceiling(ms)
    assert bound == {"total_ms": 21.5, "outside_ms": 15.0, "ceiling": round(21.5 / 15.0, 2)}
    assert bench_cpu.batching_ceiling({"proxy": 1.0}) is None
    assert bench_cpu.batching_ceiling({"Embedder": 5.0}) is None  # nothing outside: no finite bound
    assert bench_cpu.split_text(ms) == "proxy 6.0 + Embedder 6.5 + Retriever 8.0 + client 1.0"
    line = ceiling_line("/v1/embed", {1: {"cpu_ms": {}}, 16: {"cpu_ms": ms}})
    assert "at most 1.43x" in line and "concurrency 16" in line and "15.0 ms of it outside" in line
    assert "no CPU split" in ceiling_line("/v1/embed", {1: {"cpu_ms": {}}})


@pytest.mark.skipif(not bench_cpu.available(), reason="needs Linux /proc")
def test_snapshot_reads_titled_processes():
    """Two real processes titled as Ray titles Serve's: one burns CPU, one sleeps."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    procs = [
        subprocess.Popen(["bash", "-c", f'exec -a "{title}" {sys.executable} -c "$0"', code])
        for title, code in (
            ("ray::ServeReplica:appx:Embedder", burn),
            ("ray::ProxyActor", "import time; time.sleep(30)"),
        )
    ]
    try:
        start = bench_cpu.snapshot("appx")
        deadline = time.time() + 20
        while time.time() < deadline and bench_cpu.snapshot("appx").get("Embedder", 0) < 0.25:
            time.sleep(0.1)
        end = bench_cpu.snapshot("appx")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert {"Embedder", "proxy", "client"} <= set(end)
    assert end["Embedder"] >= 0.25 and end["Embedder"] > start.get("Embedder", 0.0)
    assert end["proxy"] < 0.25
