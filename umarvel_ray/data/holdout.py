"""Held-out training queries: a fixed slice of the M-BEIR train queries that no training stage sees.

The recipe's later steps need queries the model was not trained on: the re-ranker's held-out
pairwise accuracy, the distillation teacher's queries and its quality gate (fusion vs cos) would
otherwise be measured on queries stages 3-4 already fit. A query is held out when a hash of its qid
falls below `fraction`, so every job (every rank, every process, any file order) draws the same
slice without a side file, and a query's up-sampled copies share its fate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

SPLITS = ("train", "heldout", "all")


def holdout_key(qid: str) -> float:
    """A uniform number in [0, 1) fixed by the qid alone (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(f"holdout|{qid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_heldout(qid: str, fraction: float) -> bool:
    """True when `qid` belongs to the held-out slice of size ~`fraction` (0 holds nothing out)."""
    return fraction > 0 and holdout_key(str(qid)) < fraction


def split_queries(rows: Iterable[dict[str, Any]], fraction: float, split: str) -> list[dict[str, Any]]:
    """The rows (dicts with a `qid`) of one split: `train` (not held out), `heldout`, or `all`.

    Raises ValueError for an unknown split or a fraction outside [0, 1).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if split == "all" or fraction == 0:
        return list(rows) if split != "heldout" else []
    want = split == "heldout"
    return [r for r in rows if is_heldout(r["qid"], fraction) == want]
