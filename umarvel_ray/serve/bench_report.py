"""The serving bench's arithmetic and its printed lines: nearest-rank percentiles, one load point's
summary, the batched/unbatched ratio rule, the tables, the batching ceiling and the autoscaling
verdict. Pure functions of the measured numbers (no Ray, no HTTP), so the tests check them directly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from umarvel_ray.serve import bench_cpu
from umarvel_ray.serve.bench_settings import BenchSettings

DEPLOYMENT = "Embedder"  # the deployment whose batching is compared and autoscaled


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
