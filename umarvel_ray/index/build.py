"""Build an index straight from an embedding directory, streaming shards (pools > memory).

Two passes when the factory needs training: the first gathers a seeded random sample of rows,
the second adds every row batch by batch. Peak memory is one batch plus the index itself.

`rows=(lo, hi)` reads only the directory's global rows lo..hi-1 (a shard actor's slice of the
pool, found from parquet metadata: no other rows are decoded), and `row_filter` keeps the rows
it marks (a local pool cut out of a global one); both are what `index.service` shard actors use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umarvel_ray.config import ConfigError
from umarvel_ray.index.base import SearchIndex
from umarvel_ray.index.factory import RULE, min_train_vectors
from umarvel_ray.index.faiss_index import FaissIndex
from umarvel_ray.index.ids import check_unique
from umarvel_ray.index.search import build_index, new_index, pool_factory, train_sample_positions
from umarvel_ray.progress import Progress, summary
from umarvel_ray.store import (
    Embeddings,
    embedding_dim,
    iter_embedding_batches,
    list_shards,
    vectors_from_arrow,
)

log = logging.getLogger("umarvel_ray")

RowFilter = Callable[[Embeddings], np.ndarray]  # batch (ids, modalities) -> bool mask [rows]


def file_row_counts(directory: str | os.PathLike[str]) -> list[int]:
    """Rows of every `part-*.parquet` in shard order, from parquet metadata only."""
    return [pq.ParquetFile(p).metadata.num_rows for p in list_shards(directory)]


def iter_rows(
    directory: str | os.PathLike[str],
    batch_rows: int = 65_536,
    rows: tuple[int, int] | None = None,
    row_filter: RowFilter | None = None,
    columns: tuple[str, ...] = ("id", "modality", "vector"),
) -> Iterator[Embeddings]:
    """Batches of global rows [lo, hi) (all rows when None), filtered by `row_filter`.

    Files outside the range are never opened past their metadata; `row_filter` sees the id and
    modality columns of each batch (read whatever `columns` says) and returns a bool mask.
    """
    need = tuple(dict.fromkeys(("id", "modality", *columns))) if row_filter else columns
    if rows is None:
        yield from _filtered(iter_embedding_batches(directory, batch_rows, need), row_filter)
        return
    lo, hi = rows
    start = 0
    shards = list_shards(directory)
    for path, n in zip(shards, [pq.ParquetFile(p).metadata.num_rows for p in shards], strict=True):
        if start >= hi:
            break
        if start + n <= lo:
            start += n
            continue
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(need)):
            a, b = max(lo - start, 0), min(hi - start, batch.num_rows)
            start += batch.num_rows
            if b > a:
                yield from _filtered(
                    [_to_embeddings(pa.Table.from_batches([batch]).slice(a, b - a))], row_filter
                )
            if start >= hi:
                break


def _to_embeddings(table: pa.Table) -> Embeddings:
    names = table.column_names
    strings = lambda c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=object)  # noqa: E731
    return Embeddings(
        ids=strings("id"),
        vectors=vectors_from_arrow(table.column("vector")) if "vector" in names else None,
        modalities=strings("modality") if "modality" in names else None,
    )


def _filtered(
    batches: Iterator[Embeddings] | list[Embeddings], row_filter: RowFilter | None
) -> Iterator[Embeddings]:
    for batch in batches:
        if row_filter is None:
            yield batch
            continue
        keep = np.asarray(row_filter(batch), dtype=bool)
        if keep.shape != (len(batch),):
            raise ValueError(f"row_filter returned shape {keep.shape} for {len(batch)} rows")
        if keep.all():
            yield batch
        elif keep.any():
            yield Embeddings(
                ids=batch.ids[keep],
                vectors=None if batch.vectors is None else batch.vectors[keep],
                modalities=None if batch.modalities is None else batch.modalities[keep],
            )


def _train_sample(batches: Iterator[Embeddings], positions: np.ndarray) -> np.ndarray:
    """Rows at sorted `positions` (counted over the batches' rows), collected in one pass."""
    parts = []
    start = 0
    for batch in batches:
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
    rows: tuple[int, int] | None = None,
    row_filter: RowFilter | None = None,
) -> SearchIndex:
    """Index every `part-*.parquet` of an embedding directory (same options and pool-size rule as
    build_index); `rows` / `row_filter` restrict it to a slice / a subset (see the module doc)."""
    total = sum(file_row_counts(directory))
    lo, hi = (0, total) if rows is None else (max(0, rows[0]), min(total, rows[1]))
    span = (lo, hi) if rows is not None else None
    if row_filter is None:
        n = max(0, hi - lo)
    elif min_train_vectors(factory):  # the sample needs the filtered count: one id-only pass
        n = sum(len(b) for b in iter_rows(directory, batch_rows, span, row_filter, ("id", "modality")))
    else:
        n = max(0, hi - lo)  # only sizes the progress bar and the (unused) sample
    factory, nprobe = pool_factory(factory, nprobe, min(n, train_rows), str(directory))
    index = new_index(
        embedding_dim(directory), factory, fp16, device, backend, nprobe, ef_search, torch_dtype
    )
    cols = ("id", "vector")
    if isinstance(index, FaissIndex) and not index.is_trained:
        positions = train_sample_positions(n, train_rows, seed)
        index.train(_train_sample(iter_rows(directory, batch_rows, span, row_filter, cols), positions))
    prog = Progress(f"index add {directory}", total=n)
    for batch in iter_rows(directory, batch_rows, span, row_filter, cols):
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


@dataclass
class BuildIndexConfig:
    """Settings of `jobs/build_index.py`."""

    embeddings: str = field(default="", metadata={"path": "cwd", "help": "embedding directory (part-*.parquet)"})
    output: str = field(default="", metadata={"path": "cwd", "help": "index base path (<output>.faiss, .meta.json, ...)"})
    factory: str = field(
        default="Flat", metadata={"help": f"faiss factory string; Flat = exact. Pool-size rule: {RULE}"}
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 vector storage"})
    backend: str = field(default="auto", metadata={"help": "auto | faiss | torch"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    nprobe: int | None = field(default=None, metadata={"help": "IVF nprobe saved with the index"})
    train_rows: int = field(default=100_000, metadata={"help": "training sample for IVF/PQ factories"})
    seed: int = field(default=0, metadata={"help": "seed of the training sample"})
    subset_pool: str | None = field(
        default=None, metadata={"path": "cwd", "help": "pool jsonl: index only the ids it lists (all must be present)"}
    )


def check_build_config(cfg: BuildIndexConfig) -> None:
    """ConfigError (the job exits 2 before any work) for missing or absent inputs."""
    if not cfg.embeddings or not cfg.output:
        raise ConfigError("embeddings=... and output=... are required")
    if not Path(cfg.embeddings).is_dir():
        raise ConfigError(f"embedding directory not found: {cfg.embeddings}")
    if cfg.subset_pool and not Path(cfg.subset_pool).is_file():
        raise ConfigError(f"subset_pool file not found: {cfg.subset_pool}")


def run_build_index(cfg: BuildIndexConfig) -> str:
    """Build the index `cfg` describes, save it (and the resolved config beside it); returns the
    SUMMARY line. Raises ValueError when `subset_pool` lists ids the embeddings do not hold."""
    from umarvel_ray.config import save_config
    from umarvel_ray.data.mbeir import read_dids
    from umarvel_ray.store import PoolEmbeddings

    t0 = time.perf_counter()
    opts = dict(
        factory=cfg.factory, fp16=cfg.fp16, device=cfg.device, backend=cfg.backend, nprobe=cfg.nprobe,
        train_rows=cfg.train_rows, seed=cfg.seed,
    )  # fmt: skip
    if cfg.subset_pool:
        wanted = read_dids(Path(cfg.subset_pool))
        ids, vectors = PoolEmbeddings(Path(cfg.embeddings)).subset(wanted)
        if len(ids) != len(wanted):
            raise ValueError(f"{len(wanted) - len(ids)} ids of {cfg.subset_pool} are not in {cfg.embeddings}")
        index = build_index(vectors, ids, **opts)
    else:
        index = build_index_from_embeddings(cfg.embeddings, **opts)
    out = index.save(cfg.output)
    save_config(cfg, out.parent, name=f"{out.name}.config.yaml")
    return summary(
        "build_index",
        rows=len(index),
        dim=index.dim,
        backend=index.backend,
        factory=getattr(index, "factory", ""),
        output=str(out),
        seconds=f"{time.perf_counter() - t0:.1f}",
    )
