"""Server CPU per request, split by Serve process, read from /proc (Linux).

Why: on a few CPU cores the ceiling for dynamic batching is set by what a request costs outside
the Embedder (Serve's HTTP proxy, the ingress, the load client): batching can only share the
Embedder's part. With per-request CPU `total` of which `outside` is spent outside the Embedder,
saturated QPS can grow by batching at most `total / outside` (Amdahl's law, with an Embedder that
costs nothing at all), whatever the batch size. The serving bench prints this split per load point
and the ceiling it implies, so a measured batching ratio can be read against its bound.

Processes are found by the titles Ray gives them: `ray::ProxyActor` and
`ray::ServeReplica:<app>:<deployment>`; CPU is utime + stime of all their threads.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
PROXY = "proxy"
CLIENT = "client"


def _title(pid_dir: Path) -> str:
    return pid_dir.joinpath("cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace").strip()


def _cpu_s(pid_dir: Path) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = pid_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role_of(title: str, app: str) -> str | None:
    """`proxy`, the deployment name for a replica of `app`, or None for any other process."""
    if title.startswith("ray::ProxyActor"):
        return PROXY
    prefix = f"ray::ServeReplica:{app}:"
    if title.startswith(prefix):  # busy replicas add the method: `...:Embedder.handle_request`
        return title[len(prefix) :].split()[0].split(".")[0] or None
    return None


def available() -> bool:
    return PROC.joinpath("self", "stat").exists()


def snapshot(app: str) -> dict[str, float]:
    """CPU seconds so far per role: the proxy, each deployment of `app`, and this process (`client`,
    the bench's load generator, which shares the cores). Empty without /proc."""
    if not available():
        return {}
    totals: dict[str, float] = {CLIENT: sum(os.times()[:2])}
    for d in PROC.iterdir():
        if not d.name.isdigit():
            continue
        try:
            role = role_of(_title(d), app)
            if role is not None:
                totals[role] = totals.get(role, 0.0) + _cpu_s(d)
        except (OSError, IndexError, ValueError):  # the process ended while being read
            continue
    return totals


def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request per role between two snapshots (roles present in both)."""
    if requests <= 0:
        return {}
    return {r: round((after[r] - before[r]) * 1000.0 / requests, 2) for r in after if r in before}


def batching_ceiling(cpu_ms: dict[str, float], embedder: str = "Embedder") -> dict[str, float] | None:
    """Amdahl bound on saturated QPS gained by batching: total / (total - Embedder), with the
    server's and the client's CPU per request. None when the split has no Embedder or no outside."""
    if embedder not in cpu_ms:
        return None
    total = sum(cpu_ms.values())
    outside = total - cpu_ms[embedder]
    if outside <= 0:
        return None
    return {
        "total_ms": round(total, 2),
        "outside_ms": round(outside, 2),
        "ceiling": round(total / outside, 2),
    }


def split_text(cpu_ms: dict[str, float]) -> str:
    """`proxy 6.2 + Retriever 7.9 + Embedder 6.5 + client 1.1` in a stable order."""
    order = sorted(cpu_ms, key=lambda r: (r != PROXY, r == CLIENT, r != "Embedder", r))
    return " + ".join(f"{r} {cpu_ms[r]:.1f}" for r in order)
