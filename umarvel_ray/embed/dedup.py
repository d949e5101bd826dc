"""Duplicate-id detection for the embedding driver in memory that does not grow with Python objects.

The driver must reject a row whose id an earlier row already has, in the same shard or in any
committed shard (of this run or of an earlier, resumed one). Keeping every id as a Python string
costs ~100 B per row (5.6M ids: over half a GB); `CommittedIds` keeps 12 B per row instead: the
64-bit hash of every committed id (`index.ids.id_hashes`) and the int32 shard it lives in, as a
few sorted numpy runs. A hash hit is confirmed against the id strings of the named shard, read
back from its parquet file, so a collision of two distinct ids never rejects either; true hits
(duplicates in the input) are the only rows that cost a file read.

Runs merge like a binary counter (a new run is merged into the last while that one is at most
twice its size), so there are O(log N) runs and every hash is re-sorted O(log N) times overall.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umarvel_ray.index.ids import as_arrow_ids, first_occurrences, id_hashes
from umarvel_ray.store import read_shard_ids, shard_name


class CommittedIds:
    """Hashes (uint64) and shard numbers (int32) of every id kept in a committed shard."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)  # where the committed part-*.parquet files are
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, their shards)

    @classmethod
    def from_shards(cls, directory: Path, shards: Iterable[int]) -> CommittedIds:
        """The ids of already committed shards (a resumed job), read as arrow, never as str objects."""
        seen = cls(directory)
        for s in shards:
            seen.add(s, id_hashes(seen.read_ids(s)))
        return seen

    def read_ids(self, shard: int) -> pa.ChunkedArray:
        """The id column of committed shard `shard`."""
        return read_shard_ids(self.directory / shard_name(shard))

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self.runs)

    @property
    def nbytes(self) -> int:
        """Bytes held: 12 per committed id (8 hash + 4 shard)."""
        return sum(h.nbytes + s.nbytes for h, s in self.runs)

    def add(self, shard: int, hashes: np.ndarray) -> None:
        """Record the hashes of the ids just committed in `shard`."""
        if not len(hashes):
            return
        order = np.argsort(hashes, kind="stable")
        run = (np.ascontiguousarray(hashes[order], np.uint64), np.full(len(hashes), shard, np.int32))
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (h1, s1), (h2, s2) = self.runs.pop(-2), self.runs.pop()
            h, s = np.concatenate([h1, h2]), np.concatenate([s1, s2])
            order = np.argsort(h, kind="stable")  # two sorted runs: a linear merge for timsort
            self.runs.append((h[order], s[order]))

    def lookup(self, ids: pa.Array, hashes: np.ndarray) -> np.ndarray:
        """For each id, the committed shard holding the same id (int64 [N]), -1 where none does."""
        found = np.full(len(hashes), -1, np.int64)
        hits: dict[int, list[int]] = {}  # shard -> query rows whose hash it holds (true duplicates)
        for run_h, run_s in self.runs:
            lo = np.searchsorted(run_h, hashes, side="left")
            hi = np.searchsorted(run_h, hashes, side="right")
            for row in np.flatnonzero(hi > lo).tolist():
                for s in np.unique(run_s[lo[row] : hi[row]]).tolist():
                    hits.setdefault(s, []).append(row)
        for s in sorted(hits):
            rows = np.asarray(sorted(set(hits[s])), np.int64)
            rows = rows[found[rows] < 0]
            if not len(rows):
                continue
            committed = self.read_ids(s)
            same = pc.is_in(ids.take(pa.array(rows)), value_set=committed.cast(pa.large_string()))
            found[rows[same.to_numpy(zero_copy_only=False)]] = s
        return found


@dataclass
class ShardDuplicates:
    """Duplicates among one shard's candidate rows; positions index those rows."""

    embedded: np.ndarray  # int64: rows whose id is already kept in a committed shard
    embedded_in: np.ndarray  # int64: that shard, per row of `embedded`
    repeated: np.ndarray  # int64: other rows whose id an earlier row of this shard has
    first: np.ndarray  # int64: that earlier row, per row of `repeated`
    kept_hashes: np.ndarray  # uint64: id hashes of the rows to keep (all others), for `CommittedIds.add`


def find_duplicates(ids: np.ndarray, seen: CommittedIds) -> ShardDuplicates:
    """Classify one shard's candidate rows (ids [N] str, in input line order).

    A row whose id a committed shard holds is `embedded` (every such row, as before: the first
    copy was kept elsewhere); of the rest, a row whose id an earlier row has is `repeated`.
    """
    arr = as_arrow_ids(ids)
    h = id_hashes(arr)
    prev = seen.lookup(arr, h)
    embedded = np.flatnonzero(prev >= 0)
    rest = np.flatnonzero(prev < 0)
    first = first_occurrences(arr.take(pa.array(rest)), h[rest])
    is_repeat = first != np.arange(len(rest))
    return ShardDuplicates(
        embedded=embedded,
        embedded_in=prev[embedded],
        repeated=rest[is_repeat],
        first=rest[first[is_repeat]],
        kept_hashes=h[rest[~is_repeat]],
    )
