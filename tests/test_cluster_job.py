"""`ray job submit` against a real Ray head on loopback, as users submit every job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_job_on_a_local_head(tmp_path, toy_mbeir_dir):
    bin_dir = Path(sys.executable).parent
    temp_dir = Path("/tmp") / f"umr_head_{os.getpid()}"
    dash = _free_port()
    env = {
        **os.environ,
        "RAY": str(bin_dir / "ray"),
        "RAY_TEMP_DIR": str(temp_dir),
        "RAY_PORT": str(_free_port()),
        "DASHBOARD_PORT": str(dash),
        "AGENT_PORT": str(_free_port()),  # another Ray here may hold the default 52365
        "NUM_CPUS": "1",
        "OBJECT_STORE_BYTES": str(150 * 1024 * 1024),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(
            ["bash", str(REPO / "cluster/start_local_head.sh")],
            env=env,
            check=True,
            timeout=120,
            capture_output=True,
        )
        for _ in range(8):  # the head's job agent may need a few seconds more than the head itself
            job = subprocess.run(
                [
                    str(bin_dir / "ray"),
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dash}",
                    "--working-dir",
                    str(REPO),
                    "--",
                    sys.executable,
                    "jobs/validate_data.py",
                    str(toy_mbeir_dir),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if "No available agent" not in job.stderr:
                break
            time.sleep(10)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-3000:]
        assert "succeeded" in out, out[-3000:]
        assert "SUMMARY validate_data" in out, out[-3000:]
        assert "errors=0" in out, out[-3000:]
    finally:
        subprocess.run(["bash", str(REPO / "cluster/stop_local_head.sh")], env=env, timeout=60)
    leftover = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout
    assert leftover.strip() == "", f"head processes left running: {leftover}"
