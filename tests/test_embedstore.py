"""Embedding shard format: what the embedding pipeline writes is what the index reads, bit for bit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umarvel_ray.store import (
    count_rows,
    embedding_dim,
    iter_embedding_batches,
    read_embeddings,
    read_manifest,
    shard_name,
    to_table,
    vectors_from_arrow,
    write_manifest,
    write_shard,
)


def _data(n: int, dim: int, seed: int, start: int) -> tuple[list[str], list[str | None], np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs[0, :4] = [-0.0, np.float32(1e-42), np.finfo(np.float32).max, np.nextafter(np.float32(1), 2)]
    ids = [f"9:{start + i}" for i in range(n)]
    mods = ["image" if i % 3 else None for i in range(n)]
    return ids, mods, vecs


def test_round_trip_bit_exact_in_shard_name_order(tmp_path):
    a = _data(5, 8, 0, 0)
    b = _data(4, 8, 1, 5)
    # Written out of order: reading must follow shard names, not creation time.
    write_shard(tmp_path / shard_name(1), *b)
    write_shard(tmp_path / shard_name(0), *a)
    emb = read_embeddings(tmp_path)
    assert emb.vectors is not None and emb.vectors.dtype == np.float32 and emb.vectors.shape == (9, 8)
    expect = np.concatenate([a[2], b[2]])
    assert np.array_equal(emb.vectors.view(np.uint32), expect.view(np.uint32))
    assert emb.ids.tolist() == a[0] + b[0]
    assert emb.modalities is not None and emb.modalities.tolist() == a[1] + b[1]
    assert emb.manifest == {} and emb.dim == 8
    schema = pq.read_schema(tmp_path / shard_name(0))
    assert schema.field("vector").type == pa.list_(pa.float32(), 8)
    assert schema.field("id").type == pa.string() and schema.field("modality").type == pa.string()
    assert count_rows(tmp_path) == 9 and embedding_dim(tmp_path) == 8


def test_columns_subset_and_manifest(tmp_path):
    write_shard(tmp_path / shard_name(0), *_data(3, 4, 0, 0))
    assert read_manifest(tmp_path) == {}
    write_manifest(tmp_path, {"dim": 4, "kind": "candidate", "rows_out": 3})
    emb = read_embeddings(tmp_path, columns=("id",))
    assert emb.vectors is None and emb.modalities is None
    assert emb.ids.tolist() == ["9:0", "9:1", "9:2"]
    assert emb.manifest == {"dim": 4, "kind": "candidate", "rows_out": 3} and emb.dim == 4
    with pytest.raises(ValueError, match="unknown columns"):
        read_embeddings(tmp_path, columns=("id", "txt"))


def test_batches_cover_everything_in_order(tmp_path):
    parts = [_data(7, 6, s, 7 * s) for s in range(3)]
    for i, p in enumerate(parts):
        write_shard(tmp_path / shard_name(i), *p)
    batches = list(iter_embedding_batches(tmp_path, batch_rows=3))
    assert all(len(b) <= 3 for b in batches) and len(batches) == 9
    full = read_embeddings(tmp_path)
    assert np.array_equal(np.concatenate([b.vectors for b in batches]), full.vectors)
    assert np.concatenate([b.ids for b in batches]).tolist() == full.ids.tolist()


def test_temp_files_and_failed_writes_are_invisible(tmp_path):
    write_shard(tmp_path / shard_name(0), *_data(2, 4, 0, 0))
    (tmp_path / ".part-00001.parquet.tmp-123").write_bytes(b"partial garbage")
    ids, mods, vecs = _data(3, 4, 1, 2)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        write_shard(tmp_path / shard_name(2), ids[:2], mods, vecs)
    assert not (tmp_path / shard_name(2)).exists()
    assert read_embeddings(tmp_path).ids.tolist() == ["9:0", "9:1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00001.parquet.tmp-123", shard_name(0)]


def test_vector_conversion_is_zero_copy_and_slice_aware():
    _, _, vecs = _data(6, 5, 3, 0)
    table = to_table([str(i) for i in range(6)], None, vecs)
    col = table.column("vector").chunk(0)
    first, second = vectors_from_arrow(col), vectors_from_arrow(col)
    assert np.shares_memory(first, second)  # both are views of the arrow buffer
    assert np.array_equal(vectors_from_arrow(col.slice(2, 3)), vecs[2:5])
    with pytest.raises(TypeError, match="fixed_size_list"):
        vectors_from_arrow(pa.array([[1.0, 2.0]], pa.list_(pa.float32())))


def test_missing_directory_or_shards_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_embeddings(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no part"):
        read_embeddings(tmp_path)
