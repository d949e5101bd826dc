"""The embedding driver's bookkeeping: shard buffers, duplicate rejection and atomic shard commits.

Rows arrive from the Ray Data pipeline in any order; a shard is buffered until all its rows have
arrived, then committed: rejects file, parquet (tmp + rename), progress file. What the driver
keeps per row beyond the shards in flight is `CommittedIds` (12 B per kept id, numpy); the
per-shard work is vectorised (a Python object per row exists only for rejected rows).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.embed import decode
from umarvel_ray.embed.decode import FIELDS, ShardSpec
from umarvel_ray.embed.dedup import CommittedIds, find_duplicates
from umarvel_ray.io import atomic_write_json, atomic_write_lines

log = logging.getLogger("umarvel_ray.embed")

REJECTS_DIR = "_rejects"
RESULT_COLUMNS = ("shard", "line", "id", "modality", "reject_field", "reject_reason", "vector")


class InjectedFailure(RuntimeError):
    """Raised by `fail_after_shards` to simulate a job killed part-way (tests)."""


def rejects_path(out: Path, spec_name: str) -> Path:
    """The per-shard rejects file of shard `spec_name` (concatenated into rejects.jsonl at the end)."""
    return out / REJECTS_DIR / spec_name.replace(".parquet", ".jsonl")


@dataclass
class _Buffer:
    expected: int
    received: int = 0
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)


class ShardCommitter:
    """Buffers rows per shard and commits each shard once all its rows have arrived.

    `seen` (None: duplicates are not checked) holds the ids of every committed shard; `cpu_s` is
    the CPU time this bookkeeping took in the driver thread (seconds); `peak_buffered` the most
    rows held at once in incomplete shards (what bounds the driver's row memory).
    """

    def __init__(
        self,
        out: Path,
        state: dict[str, Any],
        specs: dict[int, ShardSpec],
        input_path: Path,
        kind: str,
        seen: CommittedIds | None,
        progress_path: Path,
        fail_after: int | None = None,
    ):
        self.out, self.state, self.specs = out, state, specs
        self.input_path, self.kind = str(input_path), kind
        self.seen, self.progress_path, self.fail_after = seen, progress_path, fail_after
        self.buffers = {i: _Buffer(s.rows_in) for i, s in specs.items()}
        self.committed = 0
        self.cpu_s = 0.0
        self.buffered = self.peak_buffered = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        t0 = time.thread_time()
        try:
            self._add(batch)
        finally:
            self.cpu_s += time.thread_time() - t0

    def _add(self, batch: dict[str, np.ndarray]) -> None:
        got = np.asarray(batch["vector"]).shape[-1]
        if got != self.state["dim"]:
            raise RuntimeError(f"the model returned {got}-d vectors, its config says {self.state['dim']}")
        shards = np.asarray(batch["shard"])
        for s in np.unique(shards):
            rows = np.flatnonzero(shards == s)
            buf = self.buffers.get(int(s))
            if buf is None:
                raise RuntimeError(f"row for shard {s} that is not pending")
            buf.parts.append({k: np.asarray(batch[k])[rows] for k in RESULT_COLUMNS})
            buf.received += len(rows)
            self.buffered += len(rows)
            self.peak_buffered = max(self.peak_buffered, self.buffered)
            if buf.received > buf.expected:
                raise RuntimeError(f"shard {s}: {buf.received} rows > expected {buf.expected}")
            if buf.received == buf.expected:
                self.commit(int(s))

    def commit_empty(self) -> None:
        """Shards with no rows at all (only blank lines) never receive a batch: commit them."""
        for s, buf in list(self.buffers.items()):
            if buf.expected == 0:
                self.commit(s)

    def _reject_duplicates(self, cols: dict[str, np.ndarray], reasons: dict[int, str]) -> np.ndarray:
        """Add duplicate rows of this shard to `reasons` (row -> reason); the kept rows' id hashes."""
        assert self.seen is not None
        cand = np.flatnonzero(cols["reject_field"] == "")
        dups = find_duplicates(cols["id"][cand], self.seen)
        for row, s in zip(cand[dups.embedded].tolist(), dups.embedded_in.tolist(), strict=True):
            reasons[row] = f"duplicate id {cols['id'][row]!r} (already embedded in {decode.shard_name(s)})"
        for row, first in zip(cand[dups.repeated].tolist(), cand[dups.first].tolist(), strict=True):
            reasons[row] = f"duplicate id {cols['id'][row]!r} (first at line {int(cols['line'][first])})"
        return dups.kept_hashes

    def commit(self, s: int) -> None:
        from umarvel_ray.store import write_shard

        spec, buf = self.specs[s], self.buffers.pop(s)
        self.buffered -= buf.received
        dim = self.state["dim"]
        cols = {
            k: np.concatenate([p[k] for p in buf.parts]) if buf.parts else np.zeros(0, object)
            for k in RESULT_COLUMNS
        }
        order = np.argsort(cols["line"], kind="stable") if buf.parts else np.zeros(0, int)
        cols = {k: v[order] for k, v in cols.items()}
        dup_reasons: dict[int, str] = {}
        kept_hashes = self._reject_duplicates(cols, dup_reasons) if self.seen is not None else None
        rejected = cols["reject_field"] != ""
        rejected[list(dup_reasons)] = True
        id_key = FIELDS[self.kind][0]
        rejects = []
        for i in np.flatnonzero(rejected).tolist():
            field_name, reason = str(cols["reject_field"][i]), str(cols["reject_reason"][i])
            if i in dup_reasons:
                field_name, reason = id_key, dup_reasons[i]
            rid, line = str(cols["id"][i]), int(cols["line"][i])
            rejects.append(
                {
                    "id": rid or None,
                    "file": self.input_path,
                    "line": line,
                    "field": field_name,
                    "reason": reason,
                }
            )
        rej_path = rejects_path(self.out, spec.name)
        rej_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_lines(rej_path, (json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        idx = np.flatnonzero(~rejected)
        vectors = np.asarray(cols["vector"], dtype=np.float32).reshape(-1, dim)[idx]
        path = write_shard(self.out / spec.name, cols["id"][idx].astype(str), cols["modality"][idx], vectors)
        if self.seen is not None and kept_hashes is not None:
            self.seen.add(s, kept_hashes)
        self.state["shards"][spec.name] = {
            "name": spec.name,
            "index": spec.index,
            "first_line": spec.first_line,
            "last_line": spec.last_line,
            "rows_in": spec.rows_in,
            "rows_out": len(idx),
            "rows_rejected": len(rejects),
            "bytes": path.stat().st_size,
        }
        atomic_write_json(self.progress_path, self.state)
        self.committed += 1
        log.debug("committed %s: %d rows, %d rejected", spec.name, len(idx), len(rejects))
        if self.fail_after is not None and self.committed >= self.fail_after:
            raise InjectedFailure(f"fail_after_shards={self.fail_after}: stopping after {spec.name}")
