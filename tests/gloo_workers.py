"""Run a per-worker training loop on N local gloo processes without Ray (what torchrun would do).

Each rank is a fresh `python -c` process with RANK / WORLD_SIZE / MASTER_* set, one torch thread
(2-core CI), and the loop given as "module:function" called with the config dict. Returns every
rank's CompletedProcess so a test can assert on exit codes and stderr (e.g. an injected failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

SCRIPT = """
import importlib, json, sys, torch
torch.set_num_threads(1)
mod, fn = sys.argv[1].split(":")
getattr(importlib.import_module(mod), fn)(json.loads(sys.argv[2]))
"""

EMBEDDER_LOOP = "umarvel_ray.train.embedder:train_loop_per_worker"
RERANKER_LOOP = "umarvel_ray.train.reranker:train_loop_per_worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(
    entry: str, config: dict[str, Any], world: int = 2, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks of `entry(config)` and wait for all of them (stdout/stderr captured).

    When one rank fails the others are killed after a short grace period: they would otherwise
    sit in a gloo collective until its 30-minute timeout.
    """
    port = free_port()
    with contextlib.ExitStack() as stack:
        procs, logs = [], []
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(
                    x for x in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if x
                ),
            }
            out = stack.enter_context(tempfile.TemporaryFile("w+"))
            err = stack.enter_context(tempfile.TemporaryFile("w+"))
            logs.append((out, err))
            cmd = [sys.executable, "-c", SCRIPT, entry, json.dumps(config)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err))
        _wait(procs, timeout)
        done = []
        for p, (out, err) in zip(procs, logs, strict=True):
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        return done


def _wait(procs: list[subprocess.Popen], timeout: float, grace: float = 20.0) -> None:
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > grace):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check(results: list[subprocess.CompletedProcess]) -> None:
    """Raise with every failed rank's stderr tail when any rank failed."""
    bad = [(i, r) for i, r in enumerate(results) if r.returncode != 0]
    if bad:
        raise AssertionError(
            "\n".join(f"rank {i} exited {r.returncode}:\n{r.stderr[-4000:]}" for i, r in bad)
        )
