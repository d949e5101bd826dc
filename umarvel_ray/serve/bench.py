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
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.serve import bench_cpu

log = logging.getLogger("umarvel_ray.serve.bench")

ROUTES = ("/v1/embed", "/v1/search")
ARMS = ("unbatched", "batched")
DEPLOYMENT = "Embedder"
HEADERS = {"content-type": "application/json"}
QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # Serve's per-request logs off
IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
TOY_PRESET = dict(test_queries=8, test_pool=60, test_distractors=2, train_queries=4, train_distractors=1,
                  nli_pairs=10, caption_pairs=10)  # fmt: skip


@dataclass
class BenchSettings:
    """One bench run; `quick()` and `full()` are the two presets the job offers."""

    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    requests_per_point: int = 3000
    seconds_per_point: float = 12.0
    warmup_requests: int = 64
    request_timeout_s: float = 30.0
    pool_rows: int = 200
    image_size: tuple[int, int] | None = (500, 375)  # query images as realistic JPEGs; None = toy PNGs
    batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    embedder_cpus: float = 0.5
    retriever_cpus: float = 0.25
    torch_threads: int = 1
    ray_cpus: int = 2
    object_store_mb: int = 200
    autoscale: bool = True
    autoscale_concurrency: int = 16
    autoscale_max_replicas: int = 2
    target_ongoing_requests: float = 0.5
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 15.0
    look_back_period_s: float = 3.0
    metrics_interval_s: float = 0.5
    upscale_timeout_s: float = 60.0
    hold_s: float = 8.0
    downscale_timeout_s: float = 60.0
    poll_s: float = 0.5
    seed: int = 0

    @classmethod
    def full(cls) -> BenchSettings:
        return cls()

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            concurrencies=(2, 16),
            requests_per_point=400,
            seconds_per_point=1.5,
            warmup_requests=16,
            pool_rows=48,
            autoscale_concurrency=16,
            upscale_delay_s=1.0,
            downscale_delay_s=2.0,
            look_back_period_s=1.5,
            metrics_interval_s=0.25,
            upscale_timeout_s=30.0,  # a new replica imports torch: ~8 s idle, 20 s+ on a busy machine
            hold_s=1.0,
            downscale_timeout_s=20.0,
            poll_s=0.25,
        )

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("concurrencies must be positive")
        if self.requests_per_point < 1 or self.seconds_per_point <= 0:
            raise ValueError("every load point needs a positive request count and time bound")
        if self.batch_size < 2:
            raise ValueError("the batched arm needs batch_size >= 2 (the unbatched arm uses 1)")


# ------------------------------------------------------------------------------------------------
# Pure helpers: statistics, the ratio, the tables
# ------------------------------------------------------------------------------------------------


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """Nearest-rank percentile (the smallest value with at least q% of values at or below it);
    NaN for no values. No interpolation: p99 of 100 samples is the 99th smallest."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile q must be in (0, 100], got {q}")
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return float("nan")
    return float(v[max(0, math.ceil(q / 100.0 * v.size) - 1)])


def summarize(latencies_s: list[float], errors: dict[str, int], wall_s: float) -> dict[str, Any]:
    """One load point: QPS counts successful requests only; latencies in milliseconds."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return {
        "requests": int(ms.size),
        "errors": int(sum(errors.values())),
        "error_kinds": dict(errors),
        "seconds": round(wall_s, 3),
        "qps": ms.size / wall_s if wall_s > 0 else 0.0,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
    }


def best_ratio(batched: dict[int, dict[str, Any]], unbatched: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The batched/unbatched QPS ratio at the concurrency where batched p99 is equal or better than
    unbatched p99 and batched QPS is highest (ties: the higher ratio). None when no concurrency
    qualifies (or one arm has no successful request there)."""
    best = None
    for c in sorted(set(batched) & set(unbatched)):
        b, u = batched[c], unbatched[c]
        if not (b["requests"] and u["requests"]) or not b["p99_ms"] <= u["p99_ms"]:
            continue
        ratio = b["qps"] / u["qps"]
        key = (b["qps"], ratio)
        if best is None or key > best[0]:
            best = (key, {"concurrency": c, "ratio": ratio, "batched": b, "unbatched": u})
    return None if best is None else best[1]


def ratio_line(route: str, best: dict[str, Any] | None) -> str:
    if best is None:
        return (
            f"ratio batched/unbatched QPS: none ({route}: batched p99 is worse than unbatched p99 "
            "at every concurrency measured, so no equal-or-better-p99 point exists)"
        )
    b, u = best["batched"], best["unbatched"]
    return (
        f"ratio batched/unbatched QPS: {best['ratio']:.2f} ({route} at concurrency {best['concurrency']}: "
        f"{b['qps']:.1f} vs {u['qps']:.1f} req/s, p99 {b['p99_ms']:.1f} vs {u['p99_ms']:.1f} ms)"
    )


def table(points: list[dict[str, Any]]) -> list[str]:
    """Markdown table of load points (route, arm, concurrency, summary, mean batch)."""
    out = [
        "| route | arm | concurrency | requests | errors | QPS | p50 ms | p95 ms | p99 ms | mean batch "
        "| CPU ms/req | of it Embedder |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        mb, cpu = p.get("mean_batch"), p.get("cpu_ms") or {}
        out.append(
            f"| {p['route']} | {p['arm']} | {p['concurrency']} | {p['requests']} | {p['errors']} | "
            f"{p['qps']:.1f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{'-' if mb is None else f'{mb:.1f}'} | {f'{sum(cpu.values()):.1f}' if cpu else '-'} | "
            f"{cpu.get(DEPLOYMENT, '-')} |"
        )
    return out


def ceiling_line(route: str, unbatched: dict[int, dict[str, Any]]) -> str:
    """The Amdahl bound on batching for `route`, from the unbatched arm's CPU split at its highest
    concurrency (see `bench_cpu`)."""
    if not unbatched:
        return f"batching ceiling ({route}): not measured"
    c = max(unbatched)
    cpu = unbatched[c].get("cpu_ms") or {}
    bound = bench_cpu.batching_ceiling(cpu, DEPLOYMENT)
    if bound is None:
        return f"batching ceiling ({route}): no CPU split (needs Linux /proc and an {DEPLOYMENT} replica)"
    return (
        f"batching ceiling ({route}): at most {bound['ceiling']:.2f}x on these cores: per request "
        f"{bound['total_ms']:.1f} ms CPU ({bench_cpu.split_text(cpu)}; unbatched, concurrency {c}), "
        f"{bound['outside_ms']:.1f} ms of it outside the {DEPLOYMENT}, which batching cannot share"
    )


def scaling_events(timeline: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (time, running replicas) samples where the count changed, starting with the first."""
    events: list[tuple[float, int]] = []
    for t, n in timeline:
        if not events or events[-1][1] != n:
            events.append((t, n))
    return events


def rose_and_fell(timeline: list[tuple[float, int]], load_stop_s: float) -> dict[str, Any]:
    """Did the running-replica count rise above its start under load and come back after?"""
    if not timeline:
        return {"start": None, "peak": None, "end": None, "rose": False, "fell": False}
    start, end = timeline[0][1], timeline[-1][1]
    peak = max(n for _, n in timeline)
    up = next((t for t, n in timeline if n > start), None)
    down = next((t for t, n in timeline if t >= load_stop_s and up is not None and n < peak), None)
    return {
        "start": start,
        "peak": peak,
        "end": end,
        "rose": peak > start,
        "fell": peak > start and end < peak,
        "up_at_s": up,
        "down_at_s": down,
    }


# ------------------------------------------------------------------------------------------------
# Data, model, index
# ------------------------------------------------------------------------------------------------


def build_pool(work: Path, pool_rows: int, seed: int) -> dict[str, Any]:
    """Tiny model + toy benchmark + an embedded and indexed pool, all written by the library."""
    from umarvel_ray.data import mbeir, model_items
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.toy.builder import Preset, make_toy_mbeir
    from umarvel_ray.index import build_index
    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.model.tiny import make_tiny_qwen2vl
    from umarvel_ray.store import shard_name, write_manifest, write_shard

    model_dir = make_tiny_qwen2vl(work / "tiny_model", seed=seed)
    data_root = make_toy_mbeir(work / "toy", size="small", seed=seed, preset=Preset(**TOY_PRESET))
    lines = [ln for ln in (data_root / mbeir.GLOBAL_POOL_FILE).read_text().splitlines() if ln.strip()]
    random.Random(seed).shuffle(lines)  # the union pool is grouped by dataset: mix the modalities
    lines = lines[:pool_rows]
    pool = work / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n")
    rows = mbeir.read_pool(pool).to_pylist()
    emb = Embedder.load(model_dir)
    px = (emb.cfg.inputs.min_pixels, emb.cfg.inputs.max_pixels)
    items = []
    for r in rows:
        it = model_items.candidate_item(r)
        if it["image"]:
            it["image"] = load_image(data_root, it["image"], min_pixels=px[0], max_pixels=px[1])
        items.append(it)
    vecs = emb.encode_candidates(items)
    ids = [r["did"] for r in rows]
    emb_dir = work / "embeddings"
    write_shard(emb_dir / shard_name(0), ids, [r["modality"] for r in rows], vecs)
    write_manifest(
        emb_dir,
        {
            "input": str(pool),
            "dim": int(vecs.shape[1]),
            "settings": {"input": str(pool), "data_root": str(data_root), "text_rule": "uniir"},
            "complete": True,
        },
    )
    index_dir = work / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    build_index(vecs, ids).save(index_dir / "pool")
    return {"model_dir": model_dir, "data_root": data_root, "rows": rows, "embeddings_dir": emb_dir,
            "index_dir": index_dir}  # fmt: skip


def realistic_jpeg(src: Path, size: tuple[int, int], seed: int) -> bytes:
    """The toy image upscaled to `size` (W, H) with film-grain noise, as a quality-90 JPEG: what a
    client sends for a real photo (M-BEIR's are ~256-500 px JPEGs), not an 84x84 PNG."""
    import io

    from PIL import Image

    img = Image.open(src).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 10, (size[1], size[0], 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def request_bodies(
    rows: list[dict[str, Any]], data_root: Path, image_size: tuple[int, int] | None = None
) -> dict[str, list[bytes]]:
    """Pre-serialised request bodies per route: each pool row's text and/or image (a base64 data
    URI: the toy PNG, or with `image_size` a realistic JPEG of that size) as one query item, so
    the load has the pool's modality mix."""
    import base64

    items = []
    for k, r in enumerate(rows):
        it: dict[str, Any] = {}
        if r.get("txt"):
            it["text"] = r["txt"]
        if r.get("img_path"):
            src = data_root / r["img_path"]
            if image_size:
                data, mime = realistic_jpeg(src, image_size, seed=k), "image/jpeg"
            else:
                data, mime = src.read_bytes(), IMAGE_MIME[src.suffix.lower()]
            it["image"] = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        if it:
            items.append(it)
    return {
        "/v1/embed": [json.dumps({"items": [it], "role": "query"}).encode() for it in items],
        "/v1/search": [json.dumps({"query": it, "k": 10}).encode() for it in items],
    }


def modality_mix(rows: list[dict[str, Any]]) -> dict[str, int]:
    mix: dict[str, int] = {}
    for r in rows:
        mix[r["modality"]] = mix.get(r["modality"], 0) + 1
    return dict(sorted(mix.items()))


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


def replica_count(app: str, deployment: str = DEPLOYMENT, state: str = "RUNNING") -> int:
    """Replicas of `deployment` in `state`, as `serve.status()` reports them."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    states = st.deployments[deployment].replica_states
    return int(sum(n for k, n in states.items() if str(getattr(k, "value", k)) == state))


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


def batch_totals(app: str) -> dict[str, int]:
    """Sum of the Embedder replicas' batch counters (one replica in the comparison)."""
    from ray import serve

    h = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
    return h.batch_totals.remote().result(timeout_s=30)


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


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
    t = time.perf_counter()
    pool = build_pool(work, s.pool_rows, s.seed)
    bodies = request_bodies(pool["rows"], pool["data_root"], s.image_size)
    result.facts.update(
        pool_rows=len(pool["rows"]),
        modality_mix=modality_mix(pool["rows"]),
        mean_body_kb={r: round(sum(map(len, b)) / len(b) / 1024, 1) for r, b in bodies.items()},
        prepare_s=round(time.perf_counter() - t, 1),
    )
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
    prefixes = {"batched": "/batched", "unbatched": "/unbatched"}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        t = time.perf_counter()
        deploy(app_args(pool, s, s.batch_size), "bench_batched", prefixes["batched"])
        deploy(app_args(pool, s, 1), "bench_unbatched", prefixes["unbatched"])
        for arm in ARMS:
            wait_app_running(f"bench_{arm}", 300)
        result.facts["deploy_s"] = round(time.perf_counter() - t, 1)
        result.facts["max_abs_diff_batched_vs_unbatched"] = check_same_vectors(
            base, prefixes, bodies["/v1/embed"][0]
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
        for route in ROUTES:
            for i, c in enumerate(s.concurrencies):
                arms = ARMS if i % 2 == 0 else ARMS[::-1]
                for arm in arms:
                    res = asyncio.run(measure_point(base, f"bench_{arm}", prefixes[arm], route, bodies[route], c, s))
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
        if s.autoscale:
            serve.delete("bench_unbatched")
            auto = app_args(pool, s, s.batch_size, **autoscale_args(s))
            deploy(auto, "bench_batched", prefixes["batched"])
            wait_app_running("bench_batched", 120)
            a = asyncio.run(autoscale_run(base, "bench_batched", prefixes["batched"], bodies["/v1/embed"], s))
            result.autoscaling = a
            print()
            print(autoscale_lines(a, s))
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    result.facts["total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"bench total {result.facts['total_s']}s (prepare {result.facts['prepare_s']}s, Ray start "
          f"{result.facts['ray_start_s']}s, deploy {result.facts.get('deploy_s')}s)")  # fmt: skip
    return result


def autoscale_lines(a: dict[str, Any], s: BenchSettings) -> str:
    events = " -> ".join(f"{n} (t={t:.1f}s)" for t, n in a["events"])
    lines = [
        f"autoscaling (Embedder min 1 / max {s.autoscale_max_replicas}, target_ongoing_requests "
        f"{s.target_ongoing_requests}, upscale_delay_s {s.upscale_delay_s}, downscale_delay_s "
        f"{s.downscale_delay_s}, look_back_period_s {s.look_back_period_s}, metrics_interval_s "
        f"{s.metrics_interval_s}; load: /v1/embed at concurrency {s.autoscale_concurrency}):",
        f"  running replicas from serve.status(): {events}; load stopped at t={a['load_stop_s']:.1f}s",
        f"  load: {a['load']['requests']} requests, {a['load']['errors']} errors, p99 {a['load']['p99_ms']:.1f} ms",
    ]
    if a.get("qps_before_scale_up") is not None:
        lines.append(
            f"  QPS with 1 replica {a['qps_before_scale_up']:.1f}, after the scale-up {a['qps_after_scale_up']:.1f}"
        )
    if a["rose"] and a["fell"]:
        lines.append(f"  replicas rose {a['start']} -> {a['peak']} under load and fell to {a['end']} after it")
    elif a["rose"]:
        lines.append(f"  replicas rose {a['start']} -> {a['peak']} but had not fallen back when the wait ended")
    else:
        lines.append(f"  replicas did not rise above {a['start']} within {s.upscale_timeout_s}s of load")
    return "\n".join(lines)


def quick_or_full(quick: bool, **overrides: Any) -> BenchSettings:
    base = BenchSettings.quick() if quick else BenchSettings.full()
    return replace(base, **overrides)
