"""What every index backend shares: batching, deterministic tie-breaking, top-k merging.

Ordering contract (all backends and shard merges agree on it): results are sorted by score
descending, ties broken by the string id ascending, and the set of returned candidates is the
top k under that same total order. Backends only have to return *a* correct top-kk by score;
`SearchIndex.search` fetches one extra column to see whether a tie straddles the k boundary and,
for those rows only, widens the search until the whole tie group is in hand. That makes results
independent of backend, BLAS blocking and sharding, which M-BEIR needs: pools contain exact
duplicate candidates whose scores tie bit for bit.

k larger than the index: the output is always [nq, k]; the columns beyond what the index can
return hold id "" and score -inf (metrics and run writers skip "" ids).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.index.ids import as_id_array
from umarvel_ray.progress import Progress

FORMAT_VERSION = 1
PAD_ID = ""
METRIC = "inner_product"


def base_path(path: str | os.PathLike[str]) -> Path:
    """`x`, `x.faiss` and `x.meta.json` all name the same saved index `x`."""
    p = Path(path)
    for suffix in (".faiss", ".meta.json", ".ids.npy", ".vectors.npy"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def artifact(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a tmp name so a crashed save never leaves a truncated array."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def ids_for_save(ids: np.ndarray) -> np.ndarray:
    """Fixed-width unicode: loadable without pickle."""
    return ids.astype(str) if len(ids) else np.zeros(0, dtype="<U1")


class NonFiniteVectorError(ValueError):
    """A NaN or inf in vectors given to an index (build or search)."""


def require_finite(vectors: np.ndarray, what: str, ids: Sequence[str] | np.ndarray | None = None) -> None:
    """Refuse vectors with a NaN or inf: the one check every backend runs on add and on search.

    Without it the backends disagree silently (faiss never returns a NaN candidate and gives a
    NaN query no results; torch's topk ranks NaN first), and neither says anything.
    """
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = f" (first: row {bad[0]}" + (f", id {ids[bad[0]]!r})" if ids is not None else ")")
        raise NonFiniteVectorError(
            f"{len(bad)} of {len(vectors)} {what} vectors are not finite (NaN or inf){first}; "
            "re-embed them (the embedding pipeline rejects such rows) or drop them"
        )


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [nq, {dim}], got shape {q.shape}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    require_finite(q, "query")
    return q


def order_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort every row by (score desc, id asc), padding last; returns reordered copies."""
    if scores.size == 0:
        return scores.copy(), ids.copy()
    flat = ids.reshape(-1)
    uniq, inverse = np.unique(flat.astype(str), return_inverse=True)
    rank = inverse.reshape(ids.shape).astype(np.int64)
    pad = ids == PAD_ID
    rank[pad] = len(uniq)  # "" would otherwise sort first among tied pads
    order = np.lexsort((rank, pad, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k (scores [nq, ki], ids object [nq, ki]) into the global top-k.

    Exact under the ordering contract: every member of the global top-k under (score desc,
    id asc) is in its own shard's top-k under the same order.
    """
    if not results:
        raise ValueError("nothing to merge")
    scores = np.concatenate([np.asarray(s, np.float32) for s, _ in results], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=object) for _, i in results], axis=1)
    scores, ids = order_rows(scores, ids)
    nq, width = scores.shape
    if width >= k:
        return np.ascontiguousarray(scores[:, :k]), ids[:, :k]
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), PAD_ID, dtype=object)
    out_s[:, :width], out_i[:, :width] = scores, ids
    return out_s, out_i


class SearchIndex(abc.ABC):
    """Inner-product index over string ids; subclasses provide `_search_block` on positions."""

    backend: str = ""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError("dim must be > 0")
        self.dim = int(dim)
        self._id_chunks: list[np.ndarray] = []
        self._ids_cache: np.ndarray | None = np.zeros(0, dtype=object)

    # -- ids ------------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        """String ids (object array), position-aligned with the stored vectors."""
        if self._ids_cache is None:
            self._ids_cache = np.concatenate(self._id_chunks) if self._id_chunks else np.zeros(0, object)
            self._id_chunks = [self._ids_cache]
        return self._ids_cache

    def _append_ids(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        arr = as_id_array(ids)
        self._id_chunks.append(arr)
        self._ids_cache = None
        return arr

    def __len__(self) -> int:
        return int(sum(len(c) for c in self._id_chunks))

    def check_vectors(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must be [n, {self.dim}], got shape {v.shape}")
        if len(ids) != len(v):
            raise ValueError(f"{len(ids)} ids for {len(v)} vectors")
        require_finite(v, "candidate", ids)
        return v

    # -- backend hooks --------------------------------------------------------------------
    @abc.abstractmethod
    def add(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> None:
        """Append vectors with their string ids."""

    @abc.abstractmethod
    def _search_block(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-kk by score: (scores float32 [n, kk], positions int64 [n, kk], -1 = no result)."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Persist next to `path` (`<path>.meta.json` + backend files); returns the base path."""

    # -- search ---------------------------------------------------------------------------
    def _topk_positions(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores/ids [n, k] under the ordering contract (tie groups at the cut-off fetched whole)."""
        n = len(self)
        kk = min(k + 1, n)
        scores, pos = self._search_block(q, kk)
        scores = np.where(pos < 0, -np.inf, scores).astype(np.float32)
        ids = self.ids
        # Rows whose k-th score continues to the last fetched column may hide tied candidates.
        if k < kk < n:
            widen = np.flatnonzero((scores[:, kk - 1] == scores[:, k - 1]) & np.isfinite(scores[:, k - 1]))
        else:
            widen = np.zeros(0, np.int64)
        wide: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        while len(widen):
            kk = min(2 * kk, n)
            s2, p2 = self._search_block(q[widen], kk)
            s2 = np.where(p2 < 0, -np.inf, s2).astype(np.float32)
            for j, row in enumerate(widen):
                wide[int(row)] = (s2[j], p2[j])
            done = kk >= n
            widen = (
                np.zeros(0, np.int64)
                if done
                else widen[(s2[:, kk - 1] == s2[:, k - 1]) & np.isfinite(s2[:, k - 1])]
            )
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), PAD_ID, dtype=object)
        base_ids = np.where(pos >= 0, ids[np.clip(pos, 0, None)], PAD_ID)
        tied = np.any((scores[:, 1:] == scores[:, :-1]) & np.isfinite(scores[:, 1:]), axis=1)
        sorted_s, sorted_i = scores, base_ids
        if tied.any():
            rows = np.flatnonzero(tied)
            sorted_s, sorted_i = scores.copy(), base_ids.copy()
            sorted_s[rows], sorted_i[rows] = order_rows(scores[rows], base_ids[rows])
        w = min(k, scores.shape[1])
        out_s[:, :w], out_i[:, :w] = sorted_s[:, :w], sorted_i[:, :w]
        for row, (s2, p2) in wide.items():
            rid = np.where(p2 >= 0, ids[np.clip(p2, 0, None)], PAD_ID)
            rs, ri = order_rows(s2[None, :], rid[None, :])
            w2 = min(k, rs.shape[1])
            out_s[row, :w2], out_i[row, :w2] = rs[0, :w2], ri[0, :w2]
        return out_s, out_i

    def search_arrays(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `search` but ids as an object array [nq, k] (no per-row list building)."""
        if k <= 0:
            raise ValueError("k must be > 0")
        q = as_queries(queries, self.dim)
        nq = len(q)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), PAD_ID, dtype=object)
        if len(self) == 0 or nq == 0:
            return out_s, out_i
        prog = Progress(f"search {self.backend} k={k}", total=nq, unit="queries")
        for start in range(0, nq, batch_size):
            block = q[start : start + batch_size]
            out_s[start : start + len(block)], out_i[start : start + len(block)] = self._topk_positions(
                block, k
            )
            prog.update(len(block))
        return out_s, out_i

    def search(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k per query: (scores float32 [nq, k], ids [nq][k]); see module doc for order/padding."""
        scores, ids = self.search_arrays(queries, k, batch_size)
        return scores, ids.tolist()

    # -- lifetime: the same `with` as index.service.SearchService (nothing to release here) --
    def close(self) -> None:  # noqa: B027 - a no-op on purpose
        """No-op for in-process indexes; a SearchService kills its shard actors."""

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- persistence helpers --------------------------------------------------------------
    def _meta(self, **extra: Any) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "dim": self.dim,
            "count": len(self),
            "metric": METRIC,
            **extra,
        }
