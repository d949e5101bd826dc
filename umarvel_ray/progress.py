"""Progress lines (rows/s, ETA) and the one-line summary every long job ends with."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("umarvel_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


class Progress:
    """Log `done/total rows, rows/s, ETA` at most every `every_s` seconds."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0, unit: str = "rows"):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s or (self.total is not None and self.done >= self.total):
            self._last = now
            log.info("%s", self.line())

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate
        if self.total:
            left = max(self.total - self.done, 0)
            eta = left / rate if rate > 0 else float("inf")
            return (
                f"{self.what}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.1f}%), {rate:.1f} {self.unit}/s, ETA {eta:.0f}s"
            )
        return f"{self.what}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def summary(what: str, **counts: object) -> str:
    """One greppable line of counts, logged and returned."""
    line = f"SUMMARY {what}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
    log.info("%s", line)
    return line
