"""The one shape every `jobs/*.py` entrypoint has: parse config, (join Ray), run, exit code.

Exit codes are the same for every job: 0 done, 2 bad config (nothing was started), 1 any other
failure (with its traceback in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from umarvel_ray.config import ConfigError, parse_job_args
from umarvel_ray.progress import setup_logging

T = TypeVar("T")
log = logging.getLogger("umarvel_ray.jobs")

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def run_job(
    cls: type[T],
    run: Callable[[T], Any],
    argv: list[str] | None = None,
    doc: str | None = None,
    section: str | None = None,
    needs_ray: bool = False,
    check: Callable[[T], Any] | None = None,
) -> int:
    """Parse `--config FILE key=value ...` into `cls` and call `run(cfg)`; return the exit code.

    `check(cfg)` runs right after parsing: a ConfigError there (a missing input, say) exits 2
    before anything starts. `needs_ray` then joins RAY_ADDRESS or starts a loopback local Ray,
    for library calls that expect a connected Ray (the pipelines connect on their own, honouring
    their `ray_address`).
    """
    setup_logging()
    try:
        cfg = parse_job_args(cls, argv, description=doc or "", section=section)
        if check is not None:
            check(cfg)
    except (ConfigError, ValueError) as exc:
        log.error("bad config: %s", exc)
        return EXIT_BAD_CONFIG
    try:
        if needs_ray:
            from umarvel_ray.runtime import ensure_ray

            ensure_ray()
        run(cfg)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return EXIT_BAD_CONFIG
    except Exception:
        log.exception("job failed")
        return EXIT_FAILED
    return EXIT_OK
