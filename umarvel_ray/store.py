"""On-disk embedding shards: the one format between the embedding pipeline and the index.

A directory holds `part-00000.parquet ...` (columns `id: string`, `modality: string`,
`vector: fixed_size_list<float32>[dim]`) and an optional `manifest.json`. Shards are written to a
hidden temporary name and renamed into place, so a reader (or a resumed pipeline that skips
finished shards) never sees a half-written `part-*.parquet`.

Readers: `read_embeddings` (all rows), `iter_embedding_batches` (streamed), `PoolEmbeddings`
(random access by id), `read_manifest` and `manifest_digest` (the identity of a complete directory).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umarvel_ray.io import atomic_write_json, read_json_or_none

SHARD_GLOB = "part-*.parquet"
MANIFEST_NAME = "manifest.json"
COLUMNS = ("id", "modality", "vector")


@dataclass
class Embeddings:
    """Rows of one embedding directory (or one batch of it), aligned by position.

    `modalities` / `vectors` are None when the caller did not ask for those columns.
    """

    ids: np.ndarray
    vectors: np.ndarray | None
    modalities: np.ndarray | None
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[1])
        return int(self.manifest.get("dim", 0))


def shard_name(index: int) -> str:
    """Shard file name for a 0-based shard number; names sort in shard order."""
    return f"part-{index:05d}.parquet"


def embedding_schema(dim: int) -> pa.Schema:
    """The parquet schema every shard uses (fixed-size list so vectors convert without copies)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("modality", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def to_table(ids: Sequence[str], modalities: Sequence[str | None] | None, vectors: np.ndarray) -> pa.Table:
    """Build a shard table, validating shapes so bad rows fail at write time, not at index time."""
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"vectors must be 2-D [rows, dim], got shape {vecs.shape}")
    n, dim = vecs.shape
    if dim == 0:
        raise ValueError("vectors must have dim > 0")
    id_list = [str(i) for i in ids] if not isinstance(ids, np.ndarray) else ids.astype(str).tolist()
    if len(id_list) != n:
        raise ValueError(f"{len(id_list)} ids for {n} vectors")
    if modalities is None:
        mod_arr = pa.nulls(n, pa.string())
    else:
        mod_list = list(modalities)
        if len(mod_list) != n:
            raise ValueError(f"{len(mod_list)} modalities for {n} vectors")
        mod_arr = pa.array(mod_list, pa.string())
    flat = pa.array(vecs.reshape(-1), pa.float32())
    vec_arr = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays(
        [pa.array(id_list, pa.string()), mod_arr, vec_arr], schema=embedding_schema(dim)
    )


def _tmp_name(path: Path) -> Path:
    # Leading dot and a suffix after ".parquet": never matched by SHARD_GLOB.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_shard(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    modalities: Sequence[str | None] | None,
    vectors: np.ndarray,
) -> Path:
    """Write one shard atomically (tmp file + os.replace); returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(ids, modalities, vectors)
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (written last by the pipeline, so it marks completion)."""
    return atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)


def remove_manifest(directory: str | os.PathLike[str]) -> None:
    """Mark a directory incomplete (a writer is about to change its shards): drop manifest.json."""
    (Path(directory) / MANIFEST_NAME).unlink(missing_ok=True)


def remove_embeddings(directory: str | os.PathLike[str]) -> None:
    """Delete every finished shard and the manifest (a writer starting over in `directory`)."""
    directory = Path(directory)
    for p in directory.glob(SHARD_GLOB):
        p.unlink()
    remove_manifest(directory)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The directory's manifest, or {} when none was written."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def manifest_digest(directory: str | os.PathLike[str]) -> str | None:
    """sha256 of a complete embedding directory's manifest.json, None while incomplete.

    What an index built from the directory records as its source, so that a re-embedded source
    (a new manifest) is never served from an index of the old vectors.
    """
    p = Path(directory) / MANIFEST_NAME
    data = read_json_or_none(p)
    if not isinstance(data, dict) or data.get("complete") is False:
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """All finished shards in name (= shard) order; raises if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"embedding directory not found: {directory}")
    shards = sorted(directory.glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"no {SHARD_GLOB} in {directory}")
    return shards


def shard_footer(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(rows, dim) of one shard from its parquet footer (no data read); raises if unreadable."""
    pf = pq.ParquetFile(path)
    return pf.metadata.num_rows, pf.schema_arrow.field("vector").type.list_size


def read_shard_ids(path: str | os.PathLike[str]) -> pa.ChunkedArray:
    """The id column of one shard, as arrow strings (no Python object per row)."""
    return pq.read_table(path, columns=["id"]).column("id")


def vectors_from_arrow(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float> -> float32 [rows, dim], without a copy for a single float32 chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    typ = column.type
    if not pa.types.is_fixed_size_list(typ):
        raise TypeError(f"vector column must be fixed_size_list<float32>[dim], got {typ}")
    dim = typ.list_size
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError(f"vector column has {chunk.null_count} null rows")
        # flatten() honours the chunk's slice offset (unlike .values).
        values = chunk.flatten()
        if values.null_count:
            raise ValueError("vector column has null elements")
        arr = values.to_numpy(zero_copy_only=False)
        parts.append(arr.reshape(-1, dim))
    if not parts:
        return np.zeros((0, dim), np.float32)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out if out.dtype == np.float32 else out.astype(np.float32)


def _strings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


def _check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    cols = tuple(columns)
    unknown = set(cols) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; choose from {COLUMNS}")
    if "id" not in cols:
        cols = ("id", *cols)
    return cols


def _from_table(table: pa.Table, cols: tuple[str, ...], manifest: dict[str, Any]) -> Embeddings:
    return Embeddings(
        ids=_strings(table.column("id")),
        vectors=vectors_from_arrow(table.column("vector")) if "vector" in cols else None,
        modalities=_strings(table.column("modality")) if "modality" in cols else None,
        manifest=manifest,
    )


def read_embeddings(directory: str | os.PathLike[str], columns: Sequence[str] = COLUMNS) -> Embeddings:
    """Load every shard into one array (pre-allocated, so peak memory is ~1x the vectors)."""
    cols = _check_columns(columns)
    shards = list_shards(directory)
    manifest = read_manifest(directory)
    files = [pq.ParquetFile(p) for p in shards]
    total = sum(f.metadata.num_rows for f in files)
    ids: list[np.ndarray] = []
    mods: list[np.ndarray] = []
    vectors: np.ndarray | None = None
    row = 0
    for path, f in zip(shards, files, strict=True):
        table = f.read(columns=list(cols))
        part = _from_table(table, cols, manifest)
        ids.append(part.ids)
        if part.modalities is not None:
            mods.append(part.modalities)
        if part.vectors is not None:
            if vectors is None:
                vectors = np.empty((total, part.vectors.shape[1]), np.float32)
            elif part.vectors.shape[1] != vectors.shape[1]:
                raise ValueError(
                    f"{path}: dim {part.vectors.shape[1]} != {vectors.shape[1]} of earlier shards"
                )
            vectors[row : row + len(part)] = part.vectors
        row += len(part)
    if "vector" in cols and vectors is None:
        dim = pq.read_schema(shards[0]).field("vector").type.list_size
        vectors = np.zeros((0, dim), np.float32)
    return Embeddings(
        ids=np.concatenate(ids) if ids else np.zeros(0, object),
        vectors=vectors,
        modalities=(np.concatenate(mods) if mods else np.zeros(0, object)) if "modality" in cols else None,
        manifest=manifest,
    )


def count_rows(directory: str | os.PathLike[str]) -> int:
    """Total rows over all shards, from parquet metadata only."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(directory))


def embedding_dim(directory: str | os.PathLike[str]) -> int:
    """Vector dimension from the first shard's schema (no data read)."""
    return pq.read_schema(list_shards(directory)[0]).field("vector").type.list_size


def iter_embedding_batches(
    directory: str | os.PathLike[str], batch_rows: int = 65536, columns: Sequence[str] = COLUMNS
) -> Iterator[Embeddings]:
    """Stream a pool larger than memory: batches of at most `batch_rows` rows, in shard order."""
    if batch_rows <= 0:
        raise ValueError("batch_rows must be > 0")
    cols = _check_columns(columns)
    manifest = read_manifest(directory)
    for path in list_shards(directory):
        f = pq.ParquetFile(path)
        for batch in f.iter_batches(batch_size=batch_rows, columns=list(cols)):
            yield _from_table(pa.Table.from_batches([batch]), cols, manifest)


class PoolEmbeddings:
    """Random access by id into an embedding directory (ids in memory, vectors read per shard)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.shards = list_shards(directory)
        ids, sizes = [], []
        for p in self.shards:
            col = pq.read_table(p, columns=["id"]).column("id").to_numpy(zero_copy_only=False)
            ids.append(np.asarray(col, dtype=object))
            sizes.append(len(col))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, object)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._sorted_ids = self.ids.astype(str)
        self._order = np.argsort(self._sorted_ids, kind="stable")
        self._sorted_ids = self._sorted_ids[self._order]

    def positions(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of `ids` and a mask of which were found."""
        q = np.asarray(list(ids), dtype=str)
        if not len(self._sorted_ids) or not len(q):
            return np.zeros(len(q), np.int64), np.zeros(len(q), bool)
        at = np.clip(np.searchsorted(self._sorted_ids, q), 0, len(self._sorted_ids) - 1)
        found = self._sorted_ids[at] == q
        return self._order[at].astype(np.int64), found

    def subset(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the requested ids present here, in request order; reads only the
        shards holding them."""
        pos, found = self.positions(ids)
        pos = pos[found]
        req = np.asarray(list(ids), dtype=object)[found]
        shard_of = np.searchsorted(self.offsets, pos, side="right") - 1
        vectors: np.ndarray | None = None
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            vec = vectors_from_arrow(pq.read_table(self.shards[s], columns=["vector"]).column("vector"))
            if vectors is None:
                vectors = np.empty((len(pos), vec.shape[1]), np.float32)
            vectors[rows] = vec[pos[rows] - self.offsets[s]]
        if vectors is None:
            vectors = np.zeros((0, 1), np.float32)
        return req, vectors
