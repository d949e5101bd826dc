"""Serving benchmark: dynamic batching on vs off, and autoscaling, over real HTTP on loopback.

What it does (`jobs/bench_serve.py` parses the arguments and calls `run_bench`):
1. Builds what a served model needs with the library, in a work dir: the tiny offline Qwen2-VL
   (`make_tiny_qwen2vl`), the toy benchmark (`make_toy_mbeir`), a pool of its union test pool
   embedded with `Embedder.encode_candidates`, an embedding shard + manifest and a saved index.
2. Starts its own local Ray (`ensure_ray`, 127.0.0.1) and Serve (HTTP on 127.0.0.1, a free port)
   and deploys the same app twice side by side: `batched` (Embedder `max_batch_size` N, a short
   `batch_wait_timeout_s`) and `unbatched` (`max_batch_size` 1). Everything else is equal: one
   replica per deployment, the same CPUs, threads, queue sizes, model and index. A first request
   to both checks they return the same vectors.
3. For each route (`/v1/embed` with one item per request, `/v1/search` k=10 without rerank) and
   each concurrency, runs the two arms back to back (alternating which goes first), each after a
   short untimed warm-up, with an async HTTP client (httpx): `concurrency` workers send requests
   until `requests_per_point` were sent or `seconds_per_point` passed (every request also has a
   client timeout), so every loop is bounded in count and time. Reported per point: QPS
   (successful requests / wall time), p50/p95/p99 latency, errors, and the Embedder's mean batch
   size (its batch counters before and after).
4. Prints `ratio batched/unbatched QPS: X` per route at the concurrency where batched p99 is
   equal or better than unbatched p99 and batched QPS is highest (says so when no point
   qualifies).
5. Autoscaling: deletes the unbatched app, redeploys the batched app with its Embedder on
   min 1 / max 2 replicas and short delays (`serve.run` gives every deploy a new code version, so
   its replicas restart once), drives `/v1/embed` until `serve.status()` shows 2 running replicas
   (bounded), keeps the load a few seconds, stops it and waits (bounded) until the count is back
   at 1. Prints the replica timeline.
Access logs are off and replicas log at WARNING: per-request log lines shipped to the driver
would cost more CPU than the tiny model's forward.
Shuts down only what it started: Serve (`serve.shutdown()`), and Ray when it started it.

The load generator runs in this process on the same cores as the server: on 2 cores its own CPU
(~1 ms per request) is part of what is measured, equally for both arms.

Here: the settings, the deploys and the run; the pool and request bodies are `bench_data`, the
load generator `bench_load`, the statistics and printed lines `bench_report`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from umarvel_ray.serve.bench_data import build_pool, modality_mix, request_bodies
from umarvel_ray.serve.bench_load import autoscale_run, check_same_vectors, measure_point
from umarvel_ray.serve.bench_report import autoscale_lines, best_ratio, ceiling_line, ratio_line, table
from umarvel_ray.serve.bench_settings import BenchSettings

ROUTES = ("/v1/embed", "/v1/search")
ARMS = ("unbatched", "batched")
PREFIXES = {"batched": "/batched", "unbatched": "/unbatched"}  # route prefix of each arm's app
QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # Serve's per-request logs off

# ------------------------------------------------------------------------------------------------
# Serve
# ------------------------------------------------------------------------------------------------


def app_args(pool: dict[str, Any], s: BenchSettings, max_batch_size: int, **extra: Any) -> dict[str, Any]:
    """Builder args of one arm: identical but for the Embedder's batch size."""
    top = max(s.concurrencies + (s.autoscale_concurrency,))
    args: dict[str, Any] = {
        "model_dir": str(pool["model_dir"]),
        "index_dir": str(pool["index_dir"]),
        "embeddings_dir": str(pool["embeddings_dir"]),
        "embedder.num_cpus": s.embedder_cpus,
        "embedder.torch_threads": s.torch_threads,
        "embedder.max_batch_size": max_batch_size,
        "embedder.batch_wait_timeout_s": s.batch_wait_timeout_s,
        # the same caps for both arms, above the bench's concurrency: nothing is refused with 503
        "embedder.max_ongoing_requests": max(s.batch_size, 32),
        "embedder.max_queued_requests": 4 * top + 64,
        "retriever.num_cpus": s.retriever_cpus,
        "retriever.max_ongoing_requests": 2 * top + 16,
        "retriever.max_queued_requests": 4 * top + 64,
    }
    args.update(extra)
    return args


def autoscale_args(s: BenchSettings) -> dict[str, Any]:
    return {
        "embedder.min_replicas": 1,
        "embedder.max_replicas": s.autoscale_max_replicas,
        "embedder.target_ongoing_requests": s.target_ongoing_requests,
        "embedder.upscale_delay_s": s.upscale_delay_s,
        "embedder.downscale_delay_s": s.downscale_delay_s,
        "embedder.look_back_period_s": s.look_back_period_s,
        "embedder.metrics_interval_s": s.metrics_interval_s,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deploy(args: dict[str, Any], name: str, prefix: str) -> None:
    from ray import serve

    from umarvel_ray.serve.app import build, serve_config

    with warnings.catch_warnings():
        # Ray 2.60 still reads the deprecated metrics_interval_s (its replacement env vars are
        # not wired up yet) and warns when it is set; the bench needs it for short delays.
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*")
        serve.run(build(serve_config(args)), name=name, route_prefix=prefix, blocking=False, logging_config=QUIET)


def wait_app_running(name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        st = serve.status().applications.get(name)
        last = None if st is None else str(getattr(st.status, "value", st.status))
        if last == "RUNNING":
            return
        if last is not None and "FAILED" in last:
            raise RuntimeError(f"app {name} failed to deploy: {st.message}")
        time.sleep(0.5)
    raise TimeoutError(f"app {name} not RUNNING after {timeout_s}s (last status {last})")


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    settings: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    autoscaling: dict[str, Any] | None = None


def run_bench(s: BenchSettings, work: Path) -> BenchResult:
    """The whole bench in `work` (see the module doc). Prints its tables as it goes."""
    from umarvel_ray.runtime import ensure_ray, local_ray_env

    local_ray_env()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    # Ray starts its workers at niceness 15; the client here runs at the caller's niceness.
    # Run both alike so a busy machine does not favour the load generator over the server.
    os.environ.setdefault("RAY_worker_niceness", "0")
    result = BenchResult(settings=asdict(s))
    t_all = time.perf_counter()
    pool, bodies = _prepare(s, work, result)
    t = time.perf_counter()
    started_ray = ensure_ray(
        address="local", num_cpus=s.ray_cpus, object_store_memory=s.object_store_mb * 1024 * 1024,
        include_dashboard=False,
    )  # fmt: skip
    import ray
    from ray import serve

    if serve.status().proxies:
        raise RuntimeError("Serve is already running on this Ray: the bench starts and stops its own")
    result.facts["ray_start_s"] = round(time.perf_counter() - t, 1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        _deploy_arms(pool, s, base, bodies, result)
        _compare_arms(base, bodies, s, result)
        if s.autoscale:
            _autoscale(pool, s, base, bodies, result)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    result.facts["total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"bench total {result.facts['total_s']}s (prepare {result.facts['prepare_s']}s, Ray start "
          f"{result.facts['ray_start_s']}s, deploy {result.facts.get('deploy_s')}s)")  # fmt: skip
    return result


def _prepare(s: BenchSettings, work: Path, result: BenchResult) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Model, pool and index built before Ray starts (so the timings below are Serve's alone), and
    the request bodies; what they are goes into the result's facts."""
    t = time.perf_counter()
    pool = build_pool(work, s.pool_rows, s.seed)
    bodies = request_bodies(pool["rows"], pool["data_root"], s.image_size)
    result.facts.update(
        pool_rows=len(pool["rows"]),
        modality_mix=modality_mix(pool["rows"]),
        mean_body_kb={r: round(sum(map(len, b)) / len(b) / 1024, 1) for r, b in bodies.items()},
        prepare_s=round(time.perf_counter() - t, 1),
    )
    return pool, bodies


def _deploy_arms(
    pool: dict[str, Any], s: BenchSettings, base: str, bodies: dict[str, list[bytes]], result: BenchResult
) -> None:
    """Both arms side by side, checked to embed alike before any load, then the setup line that
    says what is compared."""
    import ray

    t = time.perf_counter()
    deploy(app_args(pool, s, s.batch_size), "bench_batched", PREFIXES["batched"])
    deploy(app_args(pool, s, 1), "bench_unbatched", PREFIXES["unbatched"])
    for arm in ARMS:
        wait_app_running(f"bench_{arm}", 300)
    result.facts["deploy_s"] = round(time.perf_counter() - t, 1)
    result.facts["max_abs_diff_batched_vs_unbatched"] = check_same_vectors(
        base, PREFIXES, bodies["/v1/embed"][0]
    )
    img = "x".join(map(str, s.image_size)) + " JPEG" if s.image_size else "toy PNG"
    print(
        f"pool: {len(pool['rows'])} rows {result.facts['modality_mix']}, queries are the pool's rows (images as "
        f"{img}, mean body {result.facts['mean_body_kb']['/v1/embed']} KB); Ray {ray.cluster_resources().get('CPU')} "
        f"CPUs; Embedder 1 replica x {s.embedder_cpus} CPU, {s.torch_threads} torch thread(s); "
        f"batched: max_batch_size {s.batch_size}, batch_wait_timeout_s {s.batch_wait_timeout_s}; "
        f"unbatched: max_batch_size 1; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )


def _compare_arms(base: str, bodies: dict[str, list[bytes]], s: BenchSettings, result: BenchResult) -> None:
    """Every route at every concurrency, the two arms back to back (alternating which goes first),
    then the tables, the ratio per route and its batching ceiling."""
    for route in ROUTES:
        for i, c in enumerate(s.concurrencies):
            arms = ARMS if i % 2 == 0 else ARMS[::-1]
            for arm in arms:
                res = asyncio.run(measure_point(base, f"bench_{arm}", PREFIXES[arm], route, bodies[route], c, s))
                point = {"route": route, "arm": arm, "concurrency": c, **res}
                result.points.append(point)
                print(table([point])[-1], flush=True)
        by_arm = {
            arm: {p["concurrency"]: p for p in result.points if p["route"] == route and p["arm"] == arm}
            for arm in ARMS
        }
        result.ratios[route] = best_ratio(by_arm["batched"], by_arm["unbatched"])
    print("\n".join(["", *table(result.points), ""]))
    for route in ROUTES:
        print(ratio_line(route, result.ratios[route]))
        unbatched = {p["concurrency"]: p for p in result.points if p["route"] == route and p["arm"] == "unbatched"}
        print(ceiling_line(route, unbatched))


def _autoscale(
    pool: dict[str, Any], s: BenchSettings, base: str, bodies: dict[str, list[bytes]], result: BenchResult
) -> None:
    """The batched app alone, redeployed with an autoscaling Embedder, driven up and left to fall back."""
    from ray import serve

    serve.delete("bench_unbatched")
    auto = app_args(pool, s, s.batch_size, **autoscale_args(s))
    deploy(auto, "bench_batched", PREFIXES["batched"])
    wait_app_running("bench_batched", 120)
    a = asyncio.run(autoscale_run(base, "bench_batched", PREFIXES["batched"], bodies["/v1/embed"], s))
    result.autoscaling = a
    print()
    print(autoscale_lines(a, s))


def quick_or_full(quick: bool, **overrides: Any) -> BenchSettings:
    base = BenchSettings.quick() if quick else BenchSettings.full()
    return replace(base, **overrides)
