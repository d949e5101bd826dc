"""The serving bench's pure logic (statistics, the ratio rule, the scaling verdict, its arms' args)
and its load loop's bounds over real HTTP on loopback. The bench's numbers are never asserted."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from umarvel_ray.serve.bench import app_args, autoscale_args
from umarvel_ray.serve.bench_report import (
    best_ratio,
    percentile,
    ratio_line,
    rose_and_fell,
    scaling_events,
    summarize,
    table,
)
from umarvel_ray.serve.bench_settings import BenchSettings


def test_percentile_is_nearest_rank():
    v = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentile(v, 50) == 50 and percentile(v, 95) == 95 and percentile(v, 99) == 99
    assert percentile(v, 100) == 100 and percentile(v, 0.5) == 1
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2  # no interpolation
    assert percentile([1, 2, 3, 1000], 99) == 1000  # one slow request out of 4 is the p99
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_summarize_counts_only_successes():
    s = summarize([0.010, 0.020, 0.030, 0.040], {"503": 2, "ReadTimeout": 1}, 2.0)
    assert s["requests"] == 4 and s["errors"] == 3 and s["qps"] == 2.0
    assert s["p50_ms"] == pytest.approx(20.0) and s["p99_ms"] == pytest.approx(40.0)
    assert summarize([], {}, 1.0)["qps"] == 0.0


def _pt(qps: float, p99: float, requests: int = 100) -> dict:
    return {"qps": qps, "p99_ms": p99, "requests": requests}


def test_best_ratio_takes_highest_batched_qps_among_equal_or_better_p99():
    unbatched = {1: _pt(40, 30), 8: _pt(60, 150), 32: _pt(62, 600)}
    batched = {1: _pt(38, 35), 8: _pt(150, 90), 32: _pt(180, 600)}
    best = best_ratio(batched, unbatched)
    # c=1 fails the p99 rule; c=32 ties on p99 (allowed) and has the higher batched QPS
    assert best["concurrency"] == 32 and best["ratio"] == pytest.approx(180 / 62)
    assert "ratio batched/unbatched QPS: 2.90" in ratio_line("/v1/embed", best)
    batched[32] = _pt(180, 601)  # now worse p99 at 32: the best qualifying point is 8
    best = best_ratio(batched, unbatched)
    assert best["concurrency"] == 8 and best["ratio"] == pytest.approx(2.5)


def test_best_ratio_none_when_batched_tail_is_always_worse():
    unbatched = {1: _pt(40, 30), 8: _pt(60, 150)}
    batched = {1: _pt(45, 31), 8: _pt(150, 151), 16: _pt(200, 10)}  # 16 has no unbatched twin
    assert best_ratio(batched, unbatched) is None
    line = ratio_line("/v1/search", None)
    assert line.startswith("ratio batched/unbatched QPS: none") and "/v1/search" in line
    assert best_ratio({1: _pt(0, float("nan"), 0)}, {1: _pt(40, 30)}) is None  # no successes


def test_table_rows():
    rows = table([{"route": "/v1/embed", "arm": "batched", "concurrency": 16, "requests": 10, "errors": 0,
                   "qps": 123.456, "p50_ms": 1, "p95_ms": 2, "p99_ms": 3, "mean_batch": 7.25,
                   "cpu_ms": {"proxy": 6.0, "Retriever": 8.0, "Embedder": 6.5, "client": 1.0}}])  # fmt: skip
    assert rows[0].startswith("| route |") and rows[0].count("|") == rows[1].count("|") == rows[-1].count("|")
    assert rows[-1] == "| /v1/embed | batched | 16 | 10 | 0 | 123.5 | 1.0 | 2.0 | 3.0 | 7.2 | 21.5 | 6.5 |"
    no_cpu = table([{"route": "/v1/embed", "arm": "unbatched", "concurrency": 1, "requests": 1, "errors": 0,
                     "qps": 1.0, "p50_ms": 1, "p95_ms": 1, "p99_ms": 1, "mean_batch": None, "cpu_ms": {}}])  # fmt: skip
    assert no_cpu[-1].endswith("| - | - | - |")


def test_scaling_verdict():
    tl = [(0.0, 1), (1.0, 1), (4.0, 2), (6.0, 2), (8.0, 2), (11.0, 1), (12.0, 1)]
    assert scaling_events(tl) == [(0.0, 1), (4.0, 2), (11.0, 1)]
    v = rose_and_fell(tl, load_stop_s=7.0)
    assert v["rose"] and v["fell"] and v["peak"] == 2 and v["up_at_s"] == 4.0 and v["down_at_s"] == 11.0
    v = rose_and_fell(tl[:5], load_stop_s=7.0)
    assert v["rose"] and not v["fell"]
    assert not rose_and_fell([(0.0, 1), (5.0, 1)], 3.0)["rose"]


def test_arms_differ_only_in_batch_size(tmp_path):
    pool = {"model_dir": tmp_path / "m", "index_dir": tmp_path / "i", "embeddings_dir": tmp_path / "e"}
    s = BenchSettings.quick()
    a, b = app_args(pool, s, s.batch_size), app_args(pool, s, 1)
    assert {k for k in a if a[k] != b[k]} == {"embedder.max_batch_size"}
    assert b["embedder.max_batch_size"] == 1 and a["embedder.max_batch_size"] >= 2
    # queues hold the bench's highest concurrency, so no arm is measured on refused requests
    assert a["embedder.max_queued_requests"] > max(s.concurrencies) and a["embedder.max_ongoing_requests"] >= s.batch_size
    for preset in (BenchSettings.quick(), BenchSettings.full()):
        assert preset.requests_per_point > 0 and preset.seconds_per_point > 0 and preset.upscale_timeout_s > 0
    with pytest.raises(ValueError):
        BenchSettings(batch_size=1)


def test_autoscaling_run_scales_only_the_embedder_with_short_delays(tmp_path):
    from umarvel_ray.serve.app import serve_config

    pool = {"model_dir": tmp_path / "m", "index_dir": tmp_path / "i", "embeddings_dir": tmp_path / "e"}
    for s in (BenchSettings.quick(), BenchSettings.full()):
        cfg = serve_config(app_args(pool, s, s.batch_size, **autoscale_args(s)))
        ac = cfg.embedder.autoscaling_config()
        assert ac["min_replicas"] == 1 and ac["max_replicas"] == 2
        assert ac["metrics_interval_s"] < ac["look_back_period_s"] and ac["upscale_delay_s"] <= 3
        assert cfg.retriever.autoscaling_config()["max_replicas"] == 1
        # two Embedder replicas and the ingress fit the bench's CPUs
        assert 2 * cfg.embedder.num_cpus + cfg.retriever.num_cpus <= s.ray_cpus


# ------------------------------------------------------------------------------------------------
# The load loop over real HTTP (a minimal asyncio server on 127.0.0.1)
# ------------------------------------------------------------------------------------------------


async def _server(delay_s: float, fail_every: int = 0):
    served = {"n": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")), 0
                )
                await reader.readexactly(length)
                served["n"] += 1
                fail = fail_every and served["n"] % fail_every == 0
                await asyncio.sleep(delay_s)
                status = b"503 Service Unavailable" if fail else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served


def test_load_loop_is_bounded_in_count_and_time():
    pytest.importorskip("httpx")
    from umarvel_ray.serve.bench_load import client_for, drive

    async def main():
        server, port, served = await _server(delay_s=0.0, fail_every=5)
        url = f"http://127.0.0.1:{port}/v1/embed"
        async with client_for(4, 5.0) as client:
            counted = await drive(client, url, [b"{}"], concurrency=4, max_requests=25, max_seconds=30)
        n_count = served["n"]
        slow, port2, served2 = await _server(delay_s=0.2)
        async with client_for(3, 5.0) as client:
            t = time.perf_counter()
            timed = await drive(client, f"http://127.0.0.1:{port2}/x", [b"{}"], 3, 10**6, max_seconds=0.5)
            took = time.perf_counter() - t
        for s in (server, slow):
            s.close()
            await s.wait_closed()
        return counted, n_count, timed, took, served2["n"]

    counted, n_count, timed, took, n_timed = asyncio.run(main())
    assert n_count == 25 and counted["requests"] == 20 and counted["errors"] == 5
    assert counted["error_kinds"] == {"503": 5}
    # 3 workers x 0.2 s per request, 0.5 s budget: each worker starts at most 3 requests
    assert took < 0.5 + 0.2 + 0.3 and n_timed <= 9 and timed["requests"] == n_timed
    assert len(timed["finished_at_s"]) == n_timed


def test_request_bodies_carry_each_row_as_one_query_item(tmp_path):
    import base64
    import io
    import json

    from PIL import Image

    from umarvel_ray.serve.bench_data import request_bodies

    Image.new("RGB", (84, 84), "red").save(tmp_path / "a.png")
    rows = [{"txt": "A red square.", "img_path": "a.png"}, {"txt": "Text only.", "img_path": None},
            {"txt": None, "img_path": "a.png"}]  # fmt: skip
    toy = request_bodies(rows, tmp_path)
    embed = [json.loads(b) for b in toy["/v1/embed"]]
    assert [set(e["items"][0]) for e in embed] == [{"text", "image"}, {"text"}, {"image"}]
    assert all(e["role"] == "query" and len(e["items"]) == 1 for e in embed)
    assert embed[0]["items"][0]["image"].startswith("data:image/png;base64,")
    search = [json.loads(b) for b in toy["/v1/search"]]
    assert [s["query"] for s in search] == [e["items"][0] for e in embed] and search[0]["k"] == 10
    real = json.loads(request_bodies(rows, tmp_path, (500, 375))["/v1/embed"][0])["items"][0]["image"]
    head, b64 = real.split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (500, 375)
