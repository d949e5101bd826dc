"""Index backends agree with brute force, with each other, across shards and across save/load."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from umarvel_ray.data.mbeir import did_to_int
from umarvel_ray.index import (
    PAD_ID,
    FaissIndex,
    ShardedIndex,
    TorchExactIndex,
    build_index,
    build_index_from_embeddings,
    load_index,
    merge_topk,
    read_index_meta,
)
from umarvel_ray.index.faiss_index import require_faiss, resolve_factory
from umarvel_ray.index.search import choose_backend
from umarvel_ray.store import shard_name, write_shard


def brute_force(
    pool: np.ndarray, ids: list[str], queries: np.ndarray, k: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Reference: full score matrix, order by (score desc, id asc)."""
    scores = queries.astype(np.float64) @ pool.astype(np.float64).T
    out_s, out_i = [], []
    for row in scores:
        order = sorted(range(len(ids)), key=lambda j: (-row[j], ids[j]))[:k]
        out_s.append([row[j] for j in order])
        out_i.append([ids[j] for j in order])
    return np.array(out_s, np.float32), out_i


def tied_data(n: int = 400, dim: int = 12, nq: int = 40, seed: int = 0):
    """Small-integer vectors: every implementation computes exact scores, so ties are real ties."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    pool[50:70] = pool[3]  # a block of exact duplicates
    queries = rng.integers(-2, 3, size=(nq, dim)).astype(np.float32)
    queries[:10] = pool[3]  # these queries' top group is the duplicate block (21 tied candidates)
    ids = [f"{i % 10}:{i * 7 % 1000}" for i in range(n)]  # M-BEIR-style, shuffled string order
    return pool, ids, queries


def gaussian(n: int = 600, dim: int = 16, nq: int = 30, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, dim)).astype(np.float32),
        [f"doc-{i}" for i in range(n)],
        rng.standard_normal((nq, dim)).astype(np.float32),
    )


def boundary_ties(scores: np.ndarray, k: int) -> int:
    return int(np.sum(scores[:, k - 1] == scores[:, k]))


def test_exact_faiss_equals_brute_force_with_ties():
    pool, ids, queries = tied_data()
    k = 7
    ref_s, ref_i = brute_force(pool, ids, queries, k + 1)
    assert boundary_ties(ref_s, k) >= 10  # the tie-at-the-cut-off case is really exercised
    index = build_index(pool, ids, backend="faiss")
    scores, got = index.search(queries, k, batch_size=16)
    assert got == [r[:k] for r in ref_i]
    assert np.array_equal(scores, ref_s[:, :k])
    assert index.id_scheme == "mbeir" and np.array_equal(index.labels(), [did_to_int(s) for s in ids])


def test_exact_faiss_equals_brute_force_gaussian():
    pool, ids, queries = gaussian()
    ref_s, ref_i = brute_force(pool, ids, queries, 10)
    index = build_index(pool, ids, backend="faiss")
    scores, got = index.search(queries, 10)
    assert got == ref_i
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    assert index.id_scheme == "positional" and np.array_equal(index.labels(), np.arange(len(ids)))


@pytest.mark.parametrize("chunk_rows", [64, 100_000])
def test_torch_exact_equals_faiss(chunk_rows):
    for pool, ids, queries in (tied_data(), gaussian()):
        faiss_index = build_index(pool, ids, backend="faiss")
        torch_index = TorchExactIndex(pool.shape[1], device="cpu", chunk_rows=chunk_rows)
        for s in range(0, len(pool), 150):  # several adds: chunks are topped up across adds
            torch_index.add(ids[s : s + 150], pool[s : s + 150])
        fs, fi = faiss_index.search(queries, 9)
        ts, ti = torch_index.search(queries, 9, batch_size=7)
        assert ti == fi
        np.testing.assert_allclose(ts, fs, rtol=1e-5, atol=1e-5)


def test_fp16_storage_searches_rounded_vectors():
    pool, ids, queries = gaussian()
    rounded = pool.astype(np.float16).astype(np.float32)
    ref_s, ref_i = brute_force(rounded, ids, queries, 5)
    f16 = build_index(pool, ids, fp16=True, backend="faiss")
    assert f16.factory == "SQfp16"
    t16 = build_index(pool, ids, fp16=True, backend="torch", device="cpu")
    for index in (f16, t16):
        s, i = index.search(queries, 5)
        assert i == ref_i
        np.testing.assert_allclose(s, ref_s, atol=2e-2)
    assert resolve_factory("IVF256,Flat", True) == "IVF256,SQfp16"
    assert resolve_factory("HNSW32", True) == "HNSW32,SQfp16"
    assert resolve_factory("Flat", False) == "Flat"


def test_k_larger_than_pool_pads():
    pool, ids, queries = gaussian(n=5, nq=3)
    for backend in ("faiss", "torch"):
        index = build_index(pool, ids, backend=backend, device="cpu")
        scores, got = index.search(queries, 8)
        assert scores.shape == (3, 8) and all(len(r) == 8 for r in got)
        assert all(r[5:] == [PAD_ID] * 3 and PAD_ID not in r[:5] for r in got)
        assert np.all(np.isneginf(scores[:, 5:])) and np.all(np.isfinite(scores[:, :5]))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_save_load_round_trip(tmp_path, backend):
    pool, ids, queries = tied_data()
    index = build_index(pool, ids, backend=backend, device="cpu")
    before = index.search(queries, 12)
    saved = index.save(tmp_path / "pool")
    meta = read_index_meta(saved)
    assert meta["dim"] == 12 and meta["count"] == len(ids) and meta["factory"] == "Flat"
    assert meta["metric"] == "inner_product" and meta["backend"] == backend
    loaded = load_index(tmp_path / "pool", device="cpu")
    assert type(loaded) is type(index) and len(loaded) == len(index) and loaded.dim == 12
    after = loaded.search(queries, 12)
    assert after[1] == before[1] and np.array_equal(after[0], before[0])
    other = "torch" if backend == "faiss" else "faiss"  # cross-backend loading (GPU without faiss-gpu)
    converted = load_index(str(saved) + ".meta.json", device="cpu", backend=other)
    assert converted.backend == other and converted.search(queries, 12)[1] == before[1]


def test_sharded_search_equals_single_index(tmp_path):
    pool, ids, queries = tied_data()
    k = 9
    whole = build_index(pool, ids, backend="faiss")
    ref = whole.search(queries, k)
    # Cuts through the duplicate block (rows 50..69) so tie groups span shards.
    cuts = [(0, 60), (60, 65), (65, len(ids))]
    shards = [
        build_index(pool[a:b], ids[a:b], backend="torch" if i == 1 else "faiss", device="cpu")
        for i, (a, b) in enumerate(cuts)
    ]
    sharded = ShardedIndex(shards)
    got = sharded.search(queries, k, batch_size=8)
    assert got[1] == ref[1] and np.array_equal(got[0], ref[0])
    merged_s, merged_i = merge_topk([s.search_arrays(queries, k) for s in shards], k)
    assert merged_i.tolist() == ref[1] and np.array_equal(merged_s, ref[0])
    sharded.save(tmp_path / "sharded")
    again = load_index(tmp_path / "sharded", device="cpu")
    assert isinstance(again, ShardedIndex) and again.search(queries, k)[1] == ref[1]


def test_ivf_and_hnsw_factories(tmp_path):
    rng = np.random.default_rng(2)
    pool = rng.standard_normal((2000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[rng.choice(2000, 100, replace=False)] + 0.1 * rng.standard_normal((100, 32)).astype(
        np.float32
    )
    ids = [f"c{i}" for i in range(2000)]
    exact = build_index(pool, ids, backend="faiss").search(queries, 10)[1]

    def recall(got: list[list[str]]) -> float:
        return float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)]))

    ivf = build_index(pool, ids, factory="IVF16,Flat", nprobe=1, train_rows=1000)
    assert isinstance(ivf, FaissIndex) and ivf.is_trained
    low = recall(ivf.search(queries, 10)[1])
    ivf.set_search_params(nprobe=16)
    high = recall(ivf.search(queries, 10)[1])
    assert high > 0.9 and high > low  # nprobe really reaches faiss
    ivf.save(tmp_path / "ivf")
    assert read_index_meta(tmp_path / "ivf")["nprobe"] == 16
    assert recall(load_index(tmp_path / "ivf", device="cpu").search(queries, 10)[1]) == high
    hnsw = build_index(pool, ids, factory="HNSW16", ef_search=64)
    assert recall(hnsw.search(queries, 10)[1]) > 0.9
    with pytest.raises(ValueError, match="nprobe"):
        build_index(pool, ids, factory="Flat", nprobe=4, backend="faiss")


def test_id_schemes_and_duplicates():
    pool, _, _ = gaussian(n=6)
    index = FaissIndex(pool.shape[1], device="cpu")
    index.add(["1:5", "1:6", "2:0"], pool[:3])
    assert index.id_scheme == "mbeir"
    index.add(["x", "y", "z"], pool[3:])  # a non-M-BEIR id: everything becomes positional
    assert index.id_scheme == "positional" and np.array_equal(index.labels(), np.arange(6))
    assert index.search(pool[4:5], 1)[1] == [["y"]]
    non_canonical = build_index(pool[:2], ["9:012", "9:13"], backend="faiss")
    assert non_canonical.id_scheme == "positional"  # "9:012" would not round-trip via did_to_int
    with pytest.raises(ValueError, match="duplicate"):
        build_index(pool[:3], ["a", "b", "a"])


def test_build_from_embedding_shards(tmp_path):
    pool, ids, queries = gaussian(n=500)
    for i, s in enumerate(range(0, 500, 180)):
        write_shard(
            tmp_path / shard_name(i), ids[s : s + 180], ["text"] * len(ids[s : s + 180]), pool[s : s + 180]
        )
    streamed = build_index_from_embeddings(tmp_path, backend="faiss", batch_rows=64)
    assert streamed.search(queries, 6)[1] == build_index(pool, ids, backend="faiss").search(queries, 6)[1]
    ivf = build_index_from_embeddings(tmp_path, factory="IVF8,Flat", nprobe=8, train_rows=400, batch_rows=64)
    assert ivf.factory == "IVF8,Flat"  # 400 >= 39 x 8 training vectors: the IVF applies
    assert len(ivf) == 500 and ivf.search(queries, 6)[1] == streamed.search(queries, 6)[1]


def test_missing_faiss_is_explained_and_exact_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        require_faiss()
    assert choose_backend("Flat", device="cpu") == "torch"
    with pytest.raises(ImportError, match="faiss-cpu"):
        choose_backend("IVF16,Flat", device="cpu")


@pytest.mark.gpu
def test_torch_cuda_equals_cpu():
    pool, ids, queries = gaussian()
    cpu = build_index(pool, ids, backend="torch", device="cpu").search(queries, 10)
    for dtype in ("float32", "bfloat16"):
        gpu = build_index(pool, ids, backend="torch", device="cuda", torch_dtype=dtype).search(queries, 10)
        if dtype == "float32":
            assert gpu[1] == cpu[1]
        np.testing.assert_allclose(gpu[0], cpu[0], atol=5e-2 if dtype == "bfloat16" else 1e-4)


@pytest.mark.gpu
def test_faiss_gpu_equals_cpu():
    from umarvel_ray.index.faiss_index import faiss_num_gpus

    if faiss_num_gpus() == 0:
        pytest.skip("faiss-gpu not installed")
    pool, ids, queries = tied_data()
    cpu = build_index(pool, ids, backend="faiss", device="cpu").search(queries, 7)
    gpu = build_index(pool, ids, backend="faiss", device="cuda").search(queries, 7)
    assert gpu[1] == cpu[1] and np.array_equal(gpu[0], cpu[0])
