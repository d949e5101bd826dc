"""Build an index straight from an embedding directory, streaming shards (pools > memory).

Two passes when the factory needs training: the first gathers a seeded random sample of rows,
the second adds every row batch by batch. Peak memory is one batch plus the index itself.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from umarvel_ray.index.base import SearchIndex
from umarvel_ray.index.faiss_index import FaissIndex
from umarvel_ray.index.ids import check_unique
from umarvel_ray.index.search import new_index, pool_factory, train_sample_positions
from umarvel_ray.pipelines.embedstore import count_rows, embedding_dim, iter_embedding_batches
from umarvel_ray.progress import Progress, summary

log = logging.getLogger("umarvel_ray")


def _train_sample(directory: str | os.PathLike[str], positions: np.ndarray, batch_rows: int) -> np.ndarray:
    """Rows at sorted global `positions`, collected in one streaming pass."""
    parts = []
    start = 0
    for batch in iter_embedding_batches(directory, batch_rows, columns=("id", "vector")):
        assert batch.vectors is not None
        lo, hi = np.searchsorted(positions, [start, start + len(batch)])
        if hi > lo:
            parts.append(batch.vectors[positions[lo:hi] - start])
        start += len(batch)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build_index_from_embeddings(
    directory: str | os.PathLike[str],
    factory: str = "Flat",
    fp16: bool = False,
    device: str = "auto",
    backend: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    train_rows: int = 100_000,
    seed: int = 0,
    batch_rows: int = 65_536,
    torch_dtype: str | None = None,
) -> SearchIndex:
    """Index every `part-*.parquet` of an embedding directory (same options and pool-size rule as
    build_index)."""
    n = count_rows(directory)
    factory, nprobe = pool_factory(factory, nprobe, min(n, train_rows), str(directory))
    index = new_index(
        embedding_dim(directory), factory, fp16, device, backend, nprobe, ef_search, torch_dtype
    )
    if isinstance(index, FaissIndex) and not index.is_trained:
        index.train(_train_sample(directory, train_sample_positions(n, train_rows, seed), batch_rows))
    prog = Progress(f"index add {directory}", total=n)
    for batch in iter_embedding_batches(directory, batch_rows, columns=("id", "vector")):
        assert batch.vectors is not None
        index.add(batch.ids, batch.vectors)
        prog.update(len(batch))
    check_unique(index.ids)
    summary(
        "index_build",
        directory=directory,
        rows=len(index),
        dim=index.dim,
        backend=index.backend,
        factory=getattr(index, "factory", ""),
        seconds=round(prog.elapsed(), 2),
    )
    return index
