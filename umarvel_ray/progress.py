"""Progress lines (rows/s, ETA) and the one-line summary every long job ends with."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

log = logging.getLogger("umarvel_ray")

# Third-party warnings known to be harmless with the pinned versions, silenced here and nowhere else.
KNOWN_HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, deprecated in transformers 5.x.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed 0.19's comm layer calls torch.distributed.all_gather_into_tensor (renamed in torch 2.13).
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)


def quiet_known_noise() -> None:
    """Silence known-harmless third-party noise in this process and the processes it starts.

    Called by `setup_logging` (drivers) and at the start of every Ray worker function that loads
    models (training loops, embedding and re-ranking actors): the warnings above; DeepSpeed's
    "Setting accelerator to CPU" line, printed at every import on a machine without CUDA (we name
    the CPU accelerator instead); and transformers' per-load tqdm bars ("Loading weights",
    "Writing model shards"), which repeat for every model load in every worker.
    """
    for category, message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    quiet_known_noise()


class Progress:
    """Log `done/total rows, rows/s, ETA` at most every `every_s` seconds.

    Work that finishes within `every_s` logs nothing (its caller's summary line says what was
    done); longer work also logs its final 100% line.
    """

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0, unit: str = "rows"):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self._last >= self.every_s or (finished and now - self.start >= self.every_s):
            self._last = now
            self.lines += 1
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
