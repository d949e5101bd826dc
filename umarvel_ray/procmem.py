"""This process's memory as the benchmarks report it (MiB): current, peak and settled RSS.

Linux reads /proc/self; elsewhere `resource.getrusage` (the peak only). The peak is VmHWM, the
high-water mark of this process image: `ru_maxrss` is not used on Linux because it survives
`execve`, so a child started from a large parent would report the parent's size as its peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys


def _getrusage_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def rss_mb() -> float:
    """Resident memory now (Linux /proc/self/statm; the peak where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return _getrusage_peak_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (Linux VmHWM; getrusage elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return _getrusage_peak_mb()


def settled_rss_mb() -> float:
    """RSS after handing freed memory back (gc, Arrow's pool, glibc's malloc_trim): what a process
    really holds, not what the allocators kept from reading parquet batches."""
    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()
