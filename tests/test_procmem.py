"""Benchmark memory readings: a child's peak is its own, not the parent's it was started from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umarvel_ray.procmem import peak_rss_mb, rss_mb, settled_rss_mb

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def test_peak_follows_allocations():
    before = peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert rss_mb() >= 60 and peak_rss_mb() >= before and peak_rss_mb() >= rss_mb() - 1
    del block
    assert settled_rss_mb() <= peak_rss_mb()


def test_child_peak_is_not_the_parents():
    """ru_maxrss survives execve on Linux, so a child started from a big parent would report the
    parent's size as its own peak (the bookkeeping bench's children are started from one)."""
    big = np.ones(400 * 2**20 // 8)  # the parent holds 400 MiB while the child starts
    code = "from umarvel_ray.procmem import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout.strip())
    assert rss_mb() > 400
    assert child_peak < 200, f"child peak {child_peak:.0f} MiB includes the parent's {rss_mb():.0f} MiB"
    del big
