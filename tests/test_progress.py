"""Progress lines and the one place where known-harmless third-party noise is silenced."""

from __future__ import annotations

import logging
import warnings

from umarvel_ray.progress import Progress, quiet_known_noise


def test_short_work_logs_no_progress_line(caplog):
    with caplog.at_level(logging.INFO, logger="umarvel_ray"):
        prog = Progress("search", total=40, every_s=10.0, unit="queries")
        prog.update(40)
    assert caplog.records == [] and prog.lines == 0


def test_long_work_logs_rate_eta_and_its_final_line(caplog):
    with caplog.at_level(logging.INFO, logger="umarvel_ray"):
        prog = Progress("embed", total=4, every_s=0.0)
        prog.update(1)
        prog.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("embed: 1/4 rows (25.0%), ") and "rows/s, ETA" in lines[0]
    assert lines[1].startswith("embed: 4/4 rows (100.0%)")


def test_known_harmless_warnings_are_silenced_and_others_are_not(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2)
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single`.",
            FutureWarning, stacklevel=2,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    import os

    import torch

    assert os.environ.get("DS_ACCELERATOR") == (None if torch.cuda.is_available() else "cpu")
