"""One entry point for building, sharding, saving and loading retrieval indexes.

`build_index(vectors, ids)` picks the backend: faiss (CPU, or GPU clone/shards when faiss-gpu
sees GPUs), or `TorchExactIndex` for exact search on a CUDA machine without faiss-gpu (and as
the exact fallback when faiss is not installed). All backends share `SearchIndex.search`
semantics: see `umarvel_ray.index.base` for result order, tie-breaking and k > len padding.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.index.base import (
    FORMAT_VERSION,
    METRIC,
    SearchIndex,
    artifact,
    base_path,
    merge_topk,
)
from umarvel_ray.index.factory import factory_for_pool
from umarvel_ray.index.faiss_index import (
    FaissIndex,
    faiss_available,
    faiss_num_gpus,
    is_exact_factory,
    require_faiss,
)
from umarvel_ray.index.ids import check_unique
from umarvel_ray.index.torch_index import TorchExactIndex
from umarvel_ray.io import atomic_write_json
from umarvel_ray.progress import Progress

log = logging.getLogger("umarvel_ray")

__all__ = [
    "ExactIndex",
    "FaissIndex",
    "SearchIndex",
    "ShardedIndex",
    "TorchExactIndex",
    "build_index",
    "choose_backend",
    "load_index",
    "merge_topk",
    "new_index",
    "pool_factory",
    "read_index_meta",
    "train_sample_positions",
]


class ExactIndex(FaissIndex):
    """faiss exhaustive inner-product search (IDMap2 + Flat IP; SQfp16 storage with fp16)."""

    def __init__(self, dim: int, fp16: bool = False, device: str = "auto") -> None:
        super().__init__(dim, factory="Flat", fp16=fp16, device=device)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def choose_backend(factory: str, device: str = "auto", backend: str = "auto") -> str:
    """'faiss' or 'torch' for a factory/device request (why: GPUs without faiss-gpu, no faiss)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be auto|faiss|torch, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda, got {device!r}")
    exact = is_exact_factory(factory)
    if backend == "torch":
        if not exact:
            raise ValueError(f"the torch backend is exact search only; factory {factory!r} needs faiss")
        return "torch"
    if backend == "faiss":
        require_faiss()
        return "faiss"
    if not faiss_available():
        if exact:
            log.warning("faiss not installed: exact search falls back to torch matmul")
            return "torch"
        require_faiss()  # raises with the install hint
    if device != "cpu" and faiss_num_gpus() == 0 and _torch_cuda():
        if exact:
            return "torch"
        if device == "cuda":
            raise RuntimeError(f"factory {factory!r} on GPU needs faiss-gpu (pip install 'umarvel-ray[gpu]')")
    return "faiss"


def new_index(
    dim: int,
    factory: str = "Flat",
    fp16: bool = False,
    device: str = "auto",
    backend: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    torch_dtype: str | None = None,
    shard: bool = True,
) -> SearchIndex:
    """An empty index of the chosen backend (train/add it yourself, or use build_index)."""
    chosen = choose_backend(factory, device, backend)
    if chosen == "torch":
        dtype = torch_dtype or ("float16" if fp16 else "float32")
        return TorchExactIndex(dim, dtype=dtype, device=device)
    return FaissIndex(
        dim, factory=factory, fp16=fp16, device=device, nprobe=nprobe, ef_search=ef_search, shard=shard
    )


def pool_factory(factory: str, nprobe: int | None, train_vectors: int, pool: str) -> tuple[str, int | None]:
    """(factory, nprobe) for a pool under `index.factory.RULE`; a replaced factory is logged and
    loses its nprobe (exact search has none)."""
    used, why = factory_for_pool(factory, train_vectors)
    if why is None:
        return factory, nprobe
    log.warning("index for %s: %s", pool, why)
    return used, None


def train_sample_positions(n: int, train_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted random row positions for codebook training (all rows when n <= train_rows)."""
    if n <= train_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=train_rows, replace=False))


def build_index(
    vectors: np.ndarray,
    ids: Sequence[str] | np.ndarray,
    factory: str = "Flat",
    fp16: bool = False,
    device: str = "auto",
    backend: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    train_rows: int = 100_000,
    seed: int = 0,
    add_batch_rows: int = 262_144,
    torch_dtype: str | None = None,
) -> SearchIndex:
    """Build an inner-product index over in-memory vectors [N, D] with string ids.

    Trains on a seeded random sample of `train_rows` rows when the factory needs it (IVF, PQ);
    a pool too small to train it is searched exactly (`index.factory.RULE`, logged). Ids must be
    unique (duplicates would surface twice in every result list).
    """
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"vectors must be [N, D], got shape {vecs.shape}")
    id_arr = np.asarray(ids, dtype=object)
    if len(id_arr) != len(vecs):
        raise ValueError(f"{len(id_arr)} ids for {len(vecs)} vectors")
    check_unique(id_arr)
    factory, nprobe = pool_factory(factory, nprobe, min(len(vecs), train_rows), "in-memory pool")
    index = new_index(vecs.shape[1], factory, fp16, device, backend, nprobe, ef_search, torch_dtype)
    if isinstance(index, FaissIndex) and not index.is_trained:
        index.train(vecs[train_sample_positions(len(vecs), train_rows, seed)])
    prog = Progress(f"index add ({index.backend} {getattr(index, 'factory', '')})", total=len(vecs))
    for s in range(0, len(vecs), add_batch_rows):
        index.add(id_arr[s : s + add_batch_rows], vecs[s : s + add_batch_rows])
        prog.update(min(add_batch_rows, len(vecs) - s))
    return index


class ShardedIndex(SearchIndex):
    """Several indexes searched as one (a pool built shard by shard, or too big for one device).

    Shards return positions in their own id space; they are offset into one concatenated id space
    so the base class's tie handling applies across shards. Ids must be unique across shards.
    """

    backend = "sharded"

    def __init__(self, shards: Sequence[SearchIndex]) -> None:
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards disagree on dim: {sorted(dims)}")
        super().__init__(dims.pop())
        self.shards = list(shards)
        self._search_ids: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        if self._search_ids is not None:
            return self._search_ids
        parts = [s.ids for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, object)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def add(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> None:
        """Append to the last shard."""
        self.shards[-1].add(ids, vectors)

    def search_arrays(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        self._search_ids = self.ids  # one concatenation per search call, not per block
        try:
            return super().search_arrays(queries, k, batch_size)
        finally:
            self._search_ids = None

    def _search_block(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = [], []
        offset = 0
        for shard in self.shards:
            n = len(shard)
            if n:
                s, p = shard._search_block(queries, min(kk, n))
                scores.append(np.where(p < 0, -np.inf, s).astype(np.float32))
                positions.append(np.where(p < 0, -1, p + offset))
            offset += n
        s_all, p_all = np.concatenate(scores, 1), np.concatenate(positions, 1)
        order = np.argsort(-s_all.astype(np.float64), axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(s_all, order, 1), np.take_along_axis(p_all, order, 1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Each shard as `<path>.shard-NNNNN`, then `<path>.meta.json` listing them."""
        p = base_path(path)
        names = []
        for i, shard in enumerate(self.shards):
            names.append(shard.save(p.with_name(f"{p.name}.shard-{i:05d}")).name)
        atomic_write_json(artifact(p, ".meta.json"), self._meta(shards=names))
        return p


def read_index_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved index's meta (dim, count, factory, metric, backend, id scheme, ...)."""
    p = artifact(base_path(path), ".meta.json")
    if not p.exists():
        raise FileNotFoundError(f"no saved index at {base_path(path)} ({p.name} missing)")
    meta = json.loads(p.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("metric") != METRIC:
        raise ValueError(f"{p}: unsupported index format {meta.get('format_version')} / {meta.get('metric')}")
    return meta


def load_index(path: str | os.PathLike[str], device: str = "auto", backend: str | None = None) -> SearchIndex:
    """Load a saved index; `backend="torch"` moves an exact faiss index to torch (and vice versa)."""
    p = base_path(path)
    meta = read_index_meta(p)
    saved = meta["backend"]
    if saved == "sharded":
        return ShardedIndex(
            [load_index(p.with_name(n), device=device, backend=backend) for n in meta["shards"]]
        )
    if backend in (None, saved):
        if saved == "faiss":
            return FaissIndex.load(p, meta, device=device)
        if saved == "torch":
            return TorchExactIndex.load(p, meta, device=device)
        raise ValueError(f"{p}: unknown saved backend {saved!r}")
    if backend == "torch" and saved == "faiss":
        src = FaissIndex.load(p, meta, device="cpu")
        out: SearchIndex = TorchExactIndex(src.dim, dtype="float16" if src.fp16 else "float32", device=device)
        out.add(src.ids, src.vectors())
        return out
    if backend == "faiss" and saved == "torch":
        src_t = TorchExactIndex.load(p, meta, device="cpu")
        out = FaissIndex(src_t.dim, factory="Flat", fp16=src_t.dtype != "float32", device=device)
        out.add(src_t.ids, src_t.vectors())
        return out
    raise ValueError(f"backend must be faiss|torch|None, got {backend!r}")
