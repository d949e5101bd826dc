"""The serving bench's load generator: async HTTP workers (httpx) against the deployed apps, one
load point with its batch and CPU counters, and the autoscaling run that polls the replica count.

Every loop is bounded in count and time (and every request by the client's timeout); the load
runs in the bench's process, on the same cores as the server (see `bench`'s module doc).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from umarvel_ray.serve import bench_cpu
from umarvel_ray.serve.bench_report import DEPLOYMENT, rose_and_fell, scaling_events, summarize
from umarvel_ray.serve.bench_settings import BenchSettings

log = logging.getLogger("umarvel_ray.serve.bench")  # the bench's logger, as before the split

HEADERS = {"content-type": "application/json"}


def replica_count(app: str, deployment: str = DEPLOYMENT, state: str = "RUNNING") -> int:
    """Replicas of `deployment` in `state`, as `serve.status()` reports them."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    states = st.deployments[deployment].replica_states
    return int(sum(n for k, n in states.items() if str(getattr(k, "value", k)) == state))


def batch_totals(app: str) -> dict[str, int]:
    """Sum of the Embedder replicas' batch counters (one replica in the comparison)."""
    from ray import serve

    h = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
    return h.batch_totals.remote().result(timeout_s=30)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as e:
        raise ImportError("the serving bench needs httpx: pip install httpx (or the project's dev extra)") from e
    return httpx


async def drive(
    client: Any,
    url: str,
    bodies: list[bytes],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    stop: asyncio.Event | None = None,
    start_index: int = 0,
) -> dict[str, Any]:
    """`concurrency` workers post bodies in turn until `max_requests` were sent, `max_seconds`
    passed or `stop` is set; each request is also bounded by the client's timeout."""
    httpx = _httpx()
    latencies: list[float] = []
    finished: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def worker() -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline and not (stop and stop.is_set()):
            body = bodies[(start_index + sent) % len(bodies)]
            sent += 1
            t = time.perf_counter()
            try:
                r = await client.post(url, content=body, headers=HEADERS)
                code = r.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            done = time.perf_counter()
            if code == 200:
                latencies.append(done - t)
                finished.append(done - t0)
            else:
                errors[str(code)] = errors.get(str(code), 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out = summarize(latencies, errors, time.perf_counter() - t0)
    out["finished_at_s"] = finished
    return out


def client_for(concurrency: int, timeout_s: float) -> Any:
    httpx = _httpx()
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=timeout_s,
        trust_env=False,  # never route loopback traffic through a proxy from the environment
    )


async def measure_point(
    base: str, app: str, prefix: str, route: str, bodies: list[bytes], c: int, s: BenchSettings
) -> dict[str, Any]:
    url = f"{base}{prefix}{route}"
    async with client_for(c, s.request_timeout_s) as client:
        warm = await drive(client, url, bodies, c, s.warmup_requests, max(2.0, s.seconds_per_point))
        if warm["errors"]:
            raise RuntimeError(f"warm-up of {app} {route} failed: {warm['error_kinds']}")
        before = await asyncio.to_thread(batch_totals, app)
        cpu_before = bench_cpu.snapshot(app)
        res = await drive(client, url, bodies, c, s.requests_per_point, s.seconds_per_point, start_index=c * 7)
        cpu_after = bench_cpu.snapshot(app)
        after = await asyncio.to_thread(batch_totals, app)
    res.pop("finished_at_s")
    res["cpu_ms"] = bench_cpu.per_request_ms(cpu_before, cpu_after, res["requests"])
    batches = after["batches"] - before["batches"]
    res["mean_batch"] = (after["items"] - before["items"]) / batches if batches else None
    return res


def check_same_vectors(base: str, prefixes: dict[str, str], body: bytes) -> float:
    """Both arms embed the same query to the same vector (same model): the max abs difference."""
    httpx = _httpx()
    with httpx.Client(timeout=30, trust_env=False) as c:
        vecs = []
        for prefix in prefixes.values():
            r = c.post(f"{base}{prefix}/v1/embed", content=body, headers=HEADERS)
            r.raise_for_status()
            vecs.append(np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32))
    diff = float(np.abs(vecs[0] - vecs[1]).max())
    if diff > 1e-4:
        raise RuntimeError(f"batched and unbatched apps disagree on the same query (max abs diff {diff})")
    return diff


async def autoscale_run(base: str, app: str, prefix: str, bodies: list[bytes], s: BenchSettings) -> dict[str, Any]:
    """Load until the Embedder has scaled up (bounded), hold, stop, then wait (bounded) for it to
    scale back; the replica count is polled from serve.status() all along."""
    timeline: list[tuple[float, int]] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    state = {"up_at": None, "stop_at": None}

    async def poll(until: asyncio.Event) -> None:
        while not until.is_set():
            n = await asyncio.to_thread(replica_count, app)
            now = time.perf_counter() - t0
            timeline.append((round(now, 2), n))
            if state["up_at"] is None and n >= s.autoscale_max_replicas:
                state["up_at"] = now
            if state["stop_at"] is None and (
                (state["up_at"] is not None and now >= state["up_at"] + s.hold_s) or now >= s.upscale_timeout_s
            ):
                state["stop_at"] = now
                stop.set()
            if state["stop_at"] is not None and n <= 1 and now > state["stop_at"]:
                return
            if state["stop_at"] is not None and now >= state["stop_at"] + s.downscale_timeout_s:
                return
            await asyncio.sleep(s.poll_s)

    done = asyncio.Event()
    poller = asyncio.create_task(poll(done))
    url = f"{base}{prefix}/v1/embed"
    async with client_for(s.autoscale_concurrency, s.request_timeout_s) as client:
        load = await drive(
            client, url, bodies, s.autoscale_concurrency, 10**9, s.upscale_timeout_s + s.hold_s + 5.0, stop=stop
        )
    stop.set()
    try:  # the poller ends by itself (scaled back, or its own bound): this is a backstop
        await asyncio.wait_for(poller, timeout=s.downscale_timeout_s + s.upscale_timeout_s + 30)
    except asyncio.TimeoutError:
        log.warning("replica poller overran its bounds; reporting the timeline so far")
    finally:
        done.set()
    load_stop = state["stop_at"] if state["stop_at"] is not None else time.perf_counter() - t0
    finished = np.asarray(load.pop("finished_at_s"))
    phases = {}
    if state["up_at"] is not None:
        one = finished[finished < state["up_at"]]
        two = finished[finished >= state["up_at"]]
        phases = {
            "qps_before_scale_up": len(one) / state["up_at"] if state["up_at"] > 0 else None,
            "qps_after_scale_up": len(two) / max(1e-9, load_stop - state["up_at"]),
        }
    return {
        "timeline": timeline,
        "events": scaling_events(timeline),
        "load_stop_s": round(load_stop, 2),
        "load": load,
        **phases,
        **rose_and_fell(timeline, load_stop),
    }
