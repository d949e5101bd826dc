"""Connecting to Ray the same way on a laptop and on a cluster, plus small version shims.

Jobs call `ensure_ray()` first: under `ray job submit` (or with RAY_ADDRESS set) it joins that
cluster; on a laptop it starts an in-process local Ray bound to loopback. Everything that differs
between Ray releases lives here, in one place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def local_ray_env() -> None:
    """Environment that keeps a local Ray on loopback and without token auth (see ENVIRONMENT)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    include_dashboard: bool = True,
) -> bool:
    """Connect to Ray; return True if this call started a new local cluster.

    `address=None` joins `RAY_ADDRESS` when set (what `ray job submit` provides), otherwise starts a
    local in-process cluster on 127.0.0.1. An already-initialised Ray is reused untouched.

    A job's local Ray has its dashboard (on 127.0.0.1, port 8265 or the next free one): besides the
    UI it serves the State API, which Ray Train's PlacementGroupCleaner polls every second for the
    controller's state; without it every poll logs "Failed to query Ray Train Controller actor
    state" (hundreds of lines per run) and the cleaner can never do its job. It costs about 1 GB
    of memory; the test session, which reads no logs, turns it off.
    """
    import ray

    if ray.is_initialized():
        return False
    local_ray_env()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address == "local":
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "ray was imported before umarvel_ray, so a local Ray would bind to the external "
                "interface: import umarvel_ray first or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
            )
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return False
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    _pin_local_address()
    kwargs: dict[str, Any] = dict(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=include_dashboard,
        dashboard_host=LOOPBACK if include_dashboard else None,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        log_to_driver=True,
    )
    try:
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    finally:  # the raylet (and so every worker) has inherited them; this process need not keep them
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    log.info("started local Ray: %s", ray.cluster_resources())
    return True


def _pin_local_address() -> None:
    """Choose the local head's GCS port up front and name it in RAY_ADDRESS, which the raylet and
    so every worker inherit (`ensure_ray` restores this process's own environment afterwards). Code in workers that looks the cluster up without an address (Ray
    Train's PlacementGroupCleaner asks the State API for its controller's state) then finds this
    cluster even when other Ray instances run on the machine, where Ray's auto-detection gives up
    with "Found multiple active Ray instances"."""
    import socket

    if os.environ.get("RAY_GCS_SERVER_PORT"):
        port = int(os.environ["RAY_GCS_SERVER_PORT"])
    else:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"


def actor_pool(min_size: int, max_size: int | None = None) -> dict[str, Any]:
    """`map_batches` kwargs for an autoscaling actor pool, whatever the Ray release wants.

    Ray 2.60 deprecates `concurrency=` for actors in favour of `compute=ActorPoolStrategy(...)`;
    older releases only had `concurrency=(min, max)`.
    """
    max_size = max(min_size, max_size or min_size)
    try:
        from ray.data import ActorPoolStrategy

        return {"compute": ActorPoolStrategy(min_size=min_size, max_size=max_size)}
    except ImportError:  # pragma: no cover - very old Ray
        return {"concurrency": (min_size, max_size)}


def task_pool(max_tasks: int | None = None) -> dict[str, Any]:
    """`map_batches`/`map` kwargs for a stateless CPU stage."""
    if max_tasks is None:
        return {}
    try:
        from ray.data import TaskPoolStrategy

        return {"compute": TaskPoolStrategy(size=max_tasks)}
    except ImportError:  # pragma: no cover
        return {"concurrency": max_tasks}


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 on a CPU laptop)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
