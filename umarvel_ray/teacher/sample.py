"""The teacher's query sample: a seeded stratified fraction of each training task's queries, and the
subset file of their lines that the query embeddings are made from."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from pathlib import Path

from umarvel_ray.data.queries import QueryMeta, qid_sort_key
from umarvel_ray.rerank.offsets import read_at


def stratified_sample(
    metas: Mapping[str, QueryMeta],
    fraction: float,
    seed: int = 0,
    min_per_task: int = 1,
    max_per_task: int | None = None,
) -> dict[str, list[str]]:
    """task -> sorted sampled qids: round(fraction * n) per task, clamped to [min_per_task, n].

    Deterministic: each task draws with its own RNG seeded by (seed, task), from its qids in
    sorted order, so the sample depends neither on file order nor on the other tasks.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    by_task: dict[str, list[str]] = {}
    for qid, m in metas.items():
        by_task.setdefault(m.task, []).append(qid)
    out: dict[str, list[str]] = {}
    for task in sorted(by_task):
        qids = sorted(by_task[task], key=qid_sort_key)
        n = max(min_per_task, math.floor(fraction * len(qids) + 0.5))
        if max_per_task is not None:
            n = min(n, max_per_task)
        n = min(n, len(qids))
        rng = random.Random(f"{seed}:{task}")
        out[task] = sorted(rng.sample(qids, n), key=qid_sort_key)
    return out


def sample_lines(path: Path, chosen: list[QueryMeta]) -> tuple[list[bytes], str]:
    """The sampled queries' lines (newline-terminated, in the order of `chosen`) and a 12-hex tag of their bytes.

    The tag names the default query embedding directory and subset file, one per sample, so a new
    fraction or seed never collides with an old one.
    """
    with path.open("rb") as f:
        lines = [read_at(f, m.offset, m.length) for m in chosen]
    lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in lines]
    return lines, hashlib.sha256(b"".join(lines)).hexdigest()[:12]
