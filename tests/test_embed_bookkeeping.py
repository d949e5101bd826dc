"""The embedding driver's bookkeeping without Ray: duplicate rejection, resume, hash collisions,
vectorised id labels and hashes, and memory that holds no Python object per committed row.

The real `ShardCommitter` is fed result batches shaped exactly like the model stage's output
(`commit.RESULT_COLUMNS`), so every check runs in milliseconds and is deterministic.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umarvel_ray.data.mbeir import did_to_int, int_to_did
from umarvel_ray.embed import dedup
from umarvel_ray.embed.commit import ShardCommitter, rejects_path
from umarvel_ray.embed.decode import ShardSpec
from umarvel_ray.embed.dedup import CommittedIds
from umarvel_ray.index import ids as idm
from umarvel_ray.store import shard_name

DIM = 4
INPUT = "/data/pool.jsonl"


def _batch(shard: int, lines: list[int], ids: list[str], rejects: dict[int, str] | None = None) -> dict:
    """One model-stage result batch: rows of `shard` at `lines` (reject field per line if given)."""
    rejects = rejects or {}
    n = len(ids)
    return {
        "shard": np.full(n, shard, np.int32),
        "line": np.asarray(lines, np.int64),
        "id": np.asarray(ids, object),
        "modality": np.asarray(["text"] * n, object),
        "reject_field": np.asarray([rejects.get(ln, "") for ln in lines], object),
        "reject_reason": np.asarray(["bad row" if ln in rejects else "" for ln in lines], object),
        "vector": np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + 1,
    }


def _committer(out: Path, specs: list[ShardSpec], seen: CommittedIds | None, state: dict | None = None):
    state = state or {"settings": {}, "dim": DIM, "shards": {}}
    return ShardCommitter(
        out, state, {s.index: s for s in specs}, Path(INPUT), "candidate", seen, out / "_progress.json"
    )


def _spec(index: int, first_line: int, rows: int) -> ShardSpec:
    return ShardSpec(index, first_line, first_line + rows - 1, rows)


def _rejects(out: Path, shard: int) -> list[dict]:
    text = rejects_path(out, shard_name(shard)).read_text()
    return [json.loads(line) for line in text.splitlines()]


def _kept(out: Path, shard: int) -> list[str]:
    return pq.read_table(out / shard_name(shard), columns=["id"]).column("id").to_pylist()


def test_duplicates_within_across_shards_and_across_a_resume(tmp_path):
    specs = [_spec(0, 1, 4), _spec(1, 5, 4)]
    c = _committer(tmp_path, specs, CommittedIds(tmp_path))
    # Out of order and split over batches, as Ray Data delivers them; shard 0 completes first.
    c.add(_batch(1, [7, 5], ["1:4", "1:4"]))
    c.add(_batch(0, [3, 1, 4], ["1:1", "1:1", "1:3"], rejects={4: "txt"}))
    c.add(_batch(0, [2], ["1:2"]) | {})
    c.add(_batch(1, [8, 6], ["1:5", "1:2"]))
    assert _kept(tmp_path, 0) == ["1:1", "1:2"] and _kept(tmp_path, 1) == ["1:4", "1:5"]
    rej0, rej1 = _rejects(tmp_path, 0), _rejects(tmp_path, 1)
    assert [(r["line"], r["field"], r["reason"]) for r in rej0] == [
        (3, "did", "duplicate id '1:1' (first at line 1)"),
        (4, "txt", "bad row"),
    ]
    assert [(r["line"], r["id"], r["reason"]) for r in rej1] == [
        (6, "1:2", "duplicate id '1:2' (already embedded in part-00000.parquet)"),
        (7, "1:4", "duplicate id '1:4' (first at line 5)"),
    ]
    assert all(r["file"] == INPUT for r in rej0 + rej1)
    for e in c.state["shards"].values():
        assert (e["rows_in"], e["rows_out"], e["rows_rejected"]) == (4, 2, 2)
    # A restarted job: shards 0 and 1 are committed, shard 2 is not; the ids are read back from disk.
    resumed = CommittedIds.from_shards(tmp_path, [0, 1])
    assert len(resumed) == 4 and resumed.nbytes == 4 * 12
    c2 = _committer(tmp_path, [_spec(2, 9, 5)], resumed)
    c2.add(_batch(2, [9, 10, 11, 12, 13], ["1:5", "1:6", "1:1", "1:6", "1:5"]))
    assert _kept(tmp_path, 2) == ["1:6"]
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path, 2)] == [
        (9, "duplicate id '1:5' (already embedded in part-00001.parquet)"),
        (11, "duplicate id '1:1' (already embedded in part-00000.parquet)"),
        (12, "duplicate id '1:6' (first at line 10)"),
        (13, "duplicate id '1:5' (already embedded in part-00001.parquet)"),
    ]
    e = c2.state["shards"][shard_name(2)]
    assert (e["rows_in"], e["rows_out"], e["rows_rejected"]) == (5, 1, 4)
    # check_duplicates=false keeps every row
    c3 = _committer(tmp_path / "nodup", [_spec(0, 1, 2)], None)
    c3.add(_batch(0, [1, 2], ["1:1", "1:1"]))
    assert _kept(tmp_path / "nodup", 0) == ["1:1", "1:1"] and c3.cpu_s > 0


def test_hash_collisions_never_reject_distinct_ids(tmp_path, monkeypatch):
    """Every id hashes to the same value: only the one true duplicate may be rejected."""
    monkeypatch.setattr(dedup, "id_hashes", lambda ids: np.zeros(len(ids), np.uint64))
    c = _committer(tmp_path, [_spec(0, 1, 3), _spec(1, 4, 3)], CommittedIds(tmp_path))
    c.add(_batch(0, [1, 2, 3], ["1:1", "1:2", "1:3"]))
    c.add(_batch(1, [4, 5, 6], ["1:4", "1:5", "1:2"]))
    assert _kept(tmp_path, 0) == ["1:1", "1:2", "1:3"] and _kept(tmp_path, 1) == ["1:4", "1:5"]
    assert [r["reason"] for r in _rejects(tmp_path, 1)] == [
        "duplicate id '1:2' (already embedded in part-00000.parquet)"
    ]
    c2 = _committer(tmp_path, [_spec(2, 7, 4)], CommittedIds.from_shards(tmp_path, [0, 1]))
    c2.add(_batch(2, [7, 8, 9, 10], ["1:6", "1:7", "1:7", "1:8"]))
    assert _kept(tmp_path, 2) == ["1:6", "1:7", "1:8"]
    assert [r["reason"] for r in _rejects(tmp_path, 2)] == ["duplicate id '1:7' (first at line 8)"]
    ids = np.asarray(["a", "b", "a", "c"], object)
    collide = np.zeros(4, np.uint64)
    assert idm.first_occurrences(ids, collide).tolist() == [0, 1, 0, 3]
    assert idm.duplicate_positions(["x", "y", "z"], np.zeros(3, np.uint64)).tolist() == []


def _retained_bytes(out: Path, shards: int, rows: int) -> int:
    """Traced memory still held after committing `shards` x `rows` unique ids (batches freed)."""
    specs = [_spec(s, 1 + s * rows, rows) for s in range(shards)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        c = _committer(out, specs, CommittedIds(out))
        for s in range(shards):
            lines = list(range(1 + s * rows, 1 + (s + 1) * rows))
            c.add(_batch(s, lines, [int_to_did(90_000_000 + ln) for ln in lines]))
        # Retained means reachable: cyclic garbage the collector has not reached yet (how much
        # depends on what earlier tests left behind) is not the committer's.
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(c.seen) == shards * rows and not c.buffers
    _assert_no_per_row_containers(c, rows)
    return held


def _assert_no_per_row_containers(obj: object, rows: int) -> None:
    """No dict/list/set/tuple reachable from the committer has as many entries as a shard has rows."""
    stack, visited = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, np.ndarray):
            assert o.dtype != object, f"object array of {len(o)} in the bookkeeping"
            continue
        if isinstance(o, (dict, list, set, tuple)):
            assert len(o) < rows, f"a {type(o).__name__} of {len(o)} entries in the bookkeeping"
            stack.extend(o.values() if isinstance(o, dict) else o)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, Path)):
            stack.extend(vars(o).values())


def test_driver_bookkeeping_holds_no_python_object_per_row(tmp_path):
    """What the committer keeps grows by ~12 B per committed id (numpy), not ~100 B (a str + a dict
    slot per id, what a Python set/dict of the ids costs)."""
    _retained_bytes(tmp_path / "warm", shards=2, rows=1000)  # one-time imports and caches
    small = _retained_bytes(tmp_path / "a", shards=4, rows=1000)
    large = _retained_bytes(tmp_path / "b", shards=24, rows=1000)
    per_row = (large - small) / (20 * 1000)
    assert per_row < 24, f"{per_row:.1f} B retained per committed row"
    seen = CommittedIds.from_shards(tmp_path / "b", range(24))
    assert seen.nbytes == 12 * 24_000 and len(seen.runs) <= 6  # O(log shards) sorted runs
    assert all(np.all(h[1:] >= h[:-1]) for h, _ in seen.runs)


# ------------------------------------------------------------------------------------------------
# Vectorised labels and hashes equal the per-id reference
# ------------------------------------------------------------------------------------------------


def scalar_mbeir_labels(ids: np.ndarray) -> np.ndarray | None:
    """The per-id implementation `mbeir_labels` replaced (kept as the reference)."""
    try:
        labels = np.fromiter((did_to_int(s) for s in ids), dtype=np.int64, count=len(ids))
    except ValueError:
        return None
    if any(int_to_did(int(lab)) != s for lab, s in zip(labels, ids, strict=True)):
        return None
    return labels


ODD_IDS = [
    "9:012", "09:1", "9:1\n", "\u0663:1", "9-1", "1:10000000", "", ":", "9:", ":9", "-1:2", " 9:1",
    "9:1 ", "9:1:2", "0:0", "0:9999999", "99999999999:1", "9:+1", "9:1_0", "é:1",
]  # fmt: skip


def test_vectorised_labels_equal_the_scalar_reference():
    rng = np.random.default_rng(0)
    sample = [
        f"{d}:{n}" for d, n in zip(rng.integers(0, 100, 2000), rng.integers(0, 10_000_000, 2000), strict=True)
    ]
    arr = np.asarray(sample, object)
    assert np.array_equal(idm.mbeir_labels(arr), scalar_mbeir_labels(arr))
    assert np.array_equal(
        idm.mbeir_labels(pa.chunked_array([sample[:7], sample[7:]])), scalar_mbeir_labels(arr)
    )
    for odd in ODD_IDS:
        mixed = np.asarray(sample[:5] + [odd], object)
        want = scalar_mbeir_labels(mixed)
        got = idm.mbeir_labels(mixed)
        assert (got is None and want is None) or np.array_equal(got, want), odd
    # too large for an int64 label: the scalar loop overflowed, the vector path says "not M-BEIR"
    assert idm.mbeir_labels(["922337203685:4775807"]).tolist() == [np.iinfo(np.int64).max]
    assert idm.mbeir_labels(["922337203685:4775808"]) is None
    assert idm.mbeir_labels(np.zeros(0, object)).shape == (0,)
    with pytest.raises(TypeError):
        idm.mbeir_labels(np.asarray(["1:1", 5], object))


def test_id_hashes_are_consistent_and_checked_on_strings():
    ids = ["1:1", "1:2", "é", "", "x" * 300, "x" * 301, "1:1", "x" * 300, "\x00", "\x00\x00"]
    h = idm.id_hashes(np.asarray(ids, object))
    assert h.dtype == np.uint64 and len(h) == len(ids)
    assert h[0] == h[6] and h[4] == h[7]  # equal ids, equal hashes (short and long path)
    assert len(set(h.tolist())) == 8  # and distinct ones differ, NULs and lengths included
    sliced = pa.array(["pad", *ids]).slice(1)  # an arrow view with an offset
    assert np.array_equal(idm.id_hashes(sliced), h)
    assert np.array_equal(idm.id_hashes(pa.chunked_array([ids[:3], ids[3:]])), h)
    assert idm.duplicate_positions(ids).tolist() == [6, 7]
    with pytest.raises(ValueError, match="2 duplicate ids, e.g. \\['1:1', 'x+'\\]"):
        idm.check_unique(np.asarray(ids, object))
    idm.check_unique(np.asarray(ids[:6], object))


def test_scale_bench_stand_in_and_synthetic_pool(tmp_path, tiny_model_dir):
    """The bench's input plants the duplicates it checks for, and its stand-in keeps the model
    stage's contract (the real `EmbedActor.__call__` over real decode groups), without a model."""
    from umarvel_ray.embed import decode
    from umarvel_ray.embed.config import model_dim
    from umarvel_ray.embed.scale_bench import StandInEmbedder, write_synthetic_pool

    pool = tmp_path / "pool.jsonl"
    assert write_synthetic_pool(pool, 2500) == 2
    ids = [json.loads(line)["did"] for line in pool.read_text().splitlines()]
    assert len(ids) == 2500 and len(set(ids)) == 2498 and ids[999] == ids[499]
    index = decode.index_input(pool, shard_rows=1000, chunk_rows=300)
    records = decode.chunk_records(index.shards[:1])
    groups = decode.decode_chunks(
        {k: np.asarray([r[k] for r in records]) for k in records[0]},
        input_path=str(pool), kind="candidate", data_root=str(tmp_path), batch_size=128,
        collate=False, model=str(tiny_model_dir),
    )  # fmt: skip
    out = StandInEmbedder(str(tiny_model_dir), "candidate", use_gpu=False)(groups)
    dim = model_dim(tiny_model_dir)
    assert out["vector"].shape == (1000, dim) and sorted(out["line"].tolist()) == list(range(1, 1001))
    assert np.array_equal(out["vector"].argmax(1), out["line"] % dim) and (out["vector"].sum(1) == 1).all()
    assert (out["reject_field"] == "").all() and out["id"][0] == "1:0"
