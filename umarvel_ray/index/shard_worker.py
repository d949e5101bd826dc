"""One shard of a `SearchService`: a Ray actor that builds, loads, saves and searches its part.

A plain class (wrapped with `ray.remote` by the service) so it also runs in-process. Its faiss and
torch thread pools are sized to the CPUs the actor reserved, so N actors on one node do not each
spawn a thread per core.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from umarvel_ray.index.base import SearchIndex, base_path
from umarvel_ray.index.ids import id_hashes as hash_ids
from umarvel_ray.procmem import settled_rss_mb


class IdSubset:
    """Row filter keeping the rows whose id is in `ids` (a local pool cut out of a global store).

    Picklable, so it travels to the shard actors; membership is a vectorised sorted search.
    """

    def __init__(self, ids: Sequence[str] | np.ndarray) -> None:
        self.sorted = np.unique(np.asarray(list(ids), dtype=str))

    def __call__(self, batch: Any) -> np.ndarray:
        return np.isin(np.asarray(batch.ids, dtype=str), self.sorted, assume_unique=False)


class ShardWorker:
    """One shard of a `SearchService` (run as a Ray actor; plain class so it is testable alone)."""

    def __init__(self, shard: int, num_shards: int, threads: int = 1) -> None:
        self.shard, self.num_shards = shard, num_shards
        self.threads = max(1, int(threads))
        import umarvel_ray.index.build  # noqa: F401  (imported now: not counted in a build's time/RSS)

        self.index: SearchIndex | None = None
        self._limit_threads()

    def ready(self) -> int:
        """Round trip once the actor has started (benches time builds from here)."""
        return os.getpid()

    def _limit_threads(self) -> None:
        """faiss (OpenMP) and torch, when loaded, use the actor's reserved CPUs, not every core."""
        from umarvel_ray.index.faiss_index import faiss_available, require_faiss

        if faiss_available():
            require_faiss().omp_set_num_threads(self.threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self.threads)

    def _info(self, t0: float, rss0: float) -> dict[str, Any]:
        assert self.index is not None
        self._limit_threads()  # a build may have imported torch
        return {
            "shard": self.shard,
            "count": len(self.index),
            "dim": self.index.dim,
            "backend": self.index.backend,
            "factory": getattr(self.index, "factory", ""),
            "seconds": time.perf_counter() - t0,
            "rss_mb": (rss := settled_rss_mb()),
            "rss_added_mb": rss - rss0,
            "node": _node_id(),
        }

    def build_from_embeddings(
        self, directory: str, rows: tuple[int, int], opts: dict[str, Any], row_filter: Any = None
    ) -> dict[str, Any]:
        """Index global rows [lo, hi) of the store (filtered); replaces any previous shard."""
        from umarvel_ray.index.build import build_index_from_embeddings

        self.index = None
        t0, rss0 = time.perf_counter(), settled_rss_mb()
        self.index = build_index_from_embeddings(directory, rows=rows, row_filter=row_filter, **opts)
        return self._info(t0, rss0)

    def build_from_arrays(self, ids: np.ndarray, vectors: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
        from umarvel_ray.index.search import build_index, new_index

        self.index = None
        t0, rss0 = time.perf_counter(), settled_rss_mb()
        if len(ids):
            self.index = build_index(vectors, ids, **opts)
        else:  # more shards than rows: an empty exact shard answers with padding
            keep = ("fp16", "device", "backend", "torch_dtype")
            self.index = new_index(vectors.shape[1], "Flat", **{k: v for k, v in opts.items() if k in keep})
        return self._info(t0, rss0)

    def load(self, path: str, device: str, backend: str | None) -> dict[str, Any]:
        """This actor's part of a saved index (see `SearchService.load`)."""
        from umarvel_ray.index.search import ShardedIndex, load_index, new_index, read_index_meta

        self.index = None
        t0, rss0 = time.perf_counter(), settled_rss_mb()
        p = base_path(path)
        meta = read_index_meta(p)
        if meta["backend"] == "sharded":
            mine = meta["shards"][self.shard :: self.num_shards]
            parts = [load_index(p.with_name(n), device=device, backend=backend) for n in mine]
            if not parts:
                self.index = new_index(int(meta["dim"]), "Flat", device=device, backend=backend or "auto")
            else:
                self.index = parts[0] if len(parts) == 1 else ShardedIndex(parts)
        else:
            whole = load_index(p, device=device, backend=backend)
            lo, hi = split_rows(len(whole), self.num_shards)[self.shard]
            vectors = whole.vectors()  # type: ignore[attr-defined]  # exact indexes only (raises otherwise)
            ids = whole.ids
            fp16 = bool(getattr(whole, "fp16", False)) or getattr(whole, "dtype", "float32") != "float32"
            dtype = getattr(whole, "dtype", None)
            sub = new_index(whole.dim, "Flat", fp16, device, whole.backend, torch_dtype=dtype)
            del whole
            sub.add(ids[lo:hi], vectors[lo:hi])
            self.index = sub
        return self._info(t0, rss0)

    def save(self, path: str) -> str:
        assert self.index is not None, "nothing built"
        return self.index.save(path).name

    def search(self, queries: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.index is not None, "nothing built"
        return self.index.search_arrays(queries, k, batch_size)

    def ids(self, limit: int | None = None) -> np.ndarray:
        assert self.index is not None, "nothing built"
        return self.index.ids if limit is None else self.index.ids[:limit]

    def id_hashes(self) -> np.ndarray:
        """Sorted uint64 hashes of this shard's ids (the cross-shard duplicate check)."""
        assert self.index is not None, "nothing built"
        return np.sort(hash_ids(self.index.ids))

    def ids_with_hashes(self, hashes: np.ndarray) -> list[str]:
        assert self.index is not None, "nothing built"
        ids = self.index.ids
        return ids[np.isin(hash_ids(ids), hashes)].tolist()

    def set_search_params(self, nprobe: int | None, ef_search: int | None) -> None:
        if self.index is not None and hasattr(self.index, "set_search_params"):
            self.index.set_search_params(nprobe=nprobe, ef_search=ef_search)  # type: ignore[attr-defined]


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def split_rows(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of n rows, sizes differing by at most one."""
    edges = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
