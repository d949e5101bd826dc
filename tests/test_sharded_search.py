"""Sharded search as a Ray service (index.service): N shard actors + exact merge must return what one
in-process index returns (same ids, order, scores; ties by id), from arrays, from an embedding store
on disk and from saved indexes; actors must be gone after close."""

from __future__ import annotations

import time

import numpy as np
import pytest

from umarvel_ray.index import build_index, build_index_from_embeddings, load_index
from umarvel_ray.index.service import IdSubset, SearchService, pool_index, split_rows
from umarvel_ray.store import shard_name, write_shard

pytestmark = pytest.mark.ray


def tied_pool(n: int = 400, dim: int = 12, nq: int = 40, seed: int = 0):
    """Small-integer vectors (exact in fp32 and fp16, so scores tie bit for bit) with a block of
    duplicate vectors that straddles every shard cut used below, and queries aimed at it."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    pool[120:150] = pool[3]  # 31 identical candidates; cuts at 133 (3 shards) and 200 (2) ...
    pool[190:210] = pool[7]  # ... and another group across the 2-shard cut
    queries = rng.integers(-2, 3, size=(nq, dim)).astype(np.float32)
    queries[:8] = pool[3]
    queries[8:16] = pool[7]
    ids = [f"{i % 10}:{i * 7 % 1000}" for i in range(n)]  # string order != row order
    return pool, ids, queries


def _same(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[1].tolist() == ref[1].tolist()
    assert np.array_equal(got[0], ref[0])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_equals_single_index_with_ties(ray_cluster, num_shards):
    pool, ids, queries = tied_pool()
    # k = 7: tie groups cross the cut-off; 140 > every shard of 3 (133 rows); 450 > the pool.
    ks = (7, 140, 450)
    with SearchService(num_shards, num_cpus=0.5) as svc:
        for fp16 in (False, True):
            single = build_index(pool, ids, fp16=fp16, backend="faiss")
            svc.build_from_arrays(pool, ids, fp16=fp16, backend="faiss")
            assert len(svc) == len(pool) and svc.dim == 12
            assert [i["count"] for i in svc.infos] == [b - a for a, b in split_rows(len(pool), num_shards)]
            assert svc.factory == ("SQfp16" if fp16 else "Flat")
            for k in ks:
                ref = single.search_arrays(queries, k)
                if k == 7:  # the tie-at-the-cut-off case is really exercised
                    wider = single.search_arrays(queries, k + 1)[0]
                    assert int(np.sum(wider[:, k - 1] == wider[:, k])) >= 16
                got = svc.search_arrays(queries, k, batch_size=16)
                _same(got, ref)
                if k == 450:
                    assert (got[1][:, 400:] == "").all() and np.isneginf(got[0][:, 400:]).all()
            scores, id_lists = svc.search(queries[:3], 5)
            assert id_lists == single.search(queries[:3], 5)[1]


def test_merge_breaks_ties_by_id_across_shards(ray_cluster):
    """All candidates identical: the answer is the k smallest ids, wherever they live."""
    ids = [f"c{i:03d}" for i in range(60)][::-1]  # shard 0 holds the largest ids
    pool = np.ones((60, 4), np.float32)
    with SearchService(2, num_cpus=0.5) as svc:
        svc.build_from_arrays(pool, ids, backend="faiss")
        _, got = svc.search(np.ones((2, 4), np.float32), 5)
    assert got == [[f"c{i:03d}" for i in range(5)]] * 2


def _write_store(directory, ids, pool, rows_per_file=(70, 5, 130, 1, 94, 100)) -> None:
    start = 0
    for i, n in enumerate(rows_per_file):
        sl = slice(start, start + n)
        mods = ["image" if j % 3 == 0 else "text" for j in range(sl.start, min(sl.stop, len(ids)))]
        write_shard(directory / shard_name(i), ids[sl], mods, pool[sl])
        start += n
    assert start == len(ids)


def test_built_from_embedding_store_on_disk(ray_cluster, tmp_path):
    pool, ids, queries = tied_pool()
    store = tmp_path / "emb"
    _write_store(store, ids, pool)
    single = build_index_from_embeddings(store, backend="faiss", batch_rows=32)
    subset = ids[::3] + ids[100:140]
    sub_single = build_index(pool[[ids.index(i) for i in dict.fromkeys(subset)]], list(dict.fromkeys(subset)))
    with pool_index(store, shards=2, shard_cpus=0.5, backend="faiss", batch_rows=32) as svc:
        assert isinstance(svc, SearchService)
        assert [i["count"] for i in svc.infos] == [200, 200]
        for k in (9, 250):
            _same(svc.search_arrays(queries, k), single.search_arrays(queries, k))
        assert svc.ids.tolist() == ids and svc.first_ids(2) == ids[:2] + ids[200:202]
        # A row filter (a local pool cut out of the store) on the same actors.
        svc.build_from_embeddings(store, row_filter=IdSubset(subset), backend="faiss", batch_rows=32)
        assert len(svc) == len(sub_single)
        _same(svc.search_arrays(queries, 30), sub_single.search_arrays(queries, 30))
        # Saved sharded: readable in one process and back into 3 actors.
        svc.build_from_embeddings(store, fp16=True, backend="faiss", batch_rows=64)
        ref16 = build_index(pool, ids, fp16=True, backend="faiss").search_arrays(queries, 12)
        _same(svc.search_arrays(queries, 12), ref16)
        saved = svc.save(tmp_path / "idx" / "pool")
    assert sorted(p.name for p in saved.parent.glob("*.meta.json")) == [
        "pool.meta.json",
        "pool.shard-00000.meta.json",
        "pool.shard-00001.meta.json",
    ]
    _same(load_index(saved, device="cpu").search_arrays(queries, 12), ref16)
    single.save(tmp_path / "idx1" / "pool")
    with SearchService(3, num_cpus=0.5) as svc3:
        _same(svc3.load(saved).search_arrays(queries, 12), ref16)  # 2 files over 3 actors
        assert sorted(i["count"] for i in svc3.infos) == [0, 200, 200]
        _same(
            svc3.load(tmp_path / "idx1" / "pool").search_arrays(queries, 12),
            single.search_arrays(queries, 12),
        )
        assert [i["count"] for i in svc3.infos] == [133, 134, 133]
    # In-process path of the same helper: a plain index that closes as a no-op.
    with pool_index(store, shards=0, backend="faiss") as one:
        _same(one.search_arrays(queries, 9), single.search_arrays(queries, 9))


def test_duplicate_ids_across_shards_are_refused(ray_cluster):
    pool, ids, _ = tied_pool(n=40)
    ids[30] = ids[2]  # rows 2 and 30 land in different shards of 2
    with (
        SearchService(2, num_cpus=0.5) as svc,
        pytest.raises(ValueError, match="duplicate ids across search shards"),
    ):
        svc.build_from_arrays(pool, ids, backend="faiss")


def test_actors_are_gone_after_close(ray_cluster):
    ray = ray_cluster
    before = ray.available_resources().get("CPU", 0.0)
    pool, ids, queries = tied_pool(n=50)
    with SearchService(2, num_cpus=0.5) as svc:
        svc.build_from_arrays(pool, ids, backend="faiss")
        actors = list(svc.actors)
        assert ray.get(actors[1].ids.remote()).tolist() == ids[25:]
    assert svc.actors == [] and len(svc) == 0
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.ids.remote(), timeout=30)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) >= before
    with pytest.raises(RuntimeError, match="holds no index"):
        svc.search_arrays(queries, 3)
    with pytest.raises(ValueError, match="do not fit"):
        SearchService(3, num_cpus=1.0)  # 3 CPUs on a 2-CPU cluster: refused, not left pending


# ---------------------------------------------------------------------------------------------
# The jobs: index_shards=2 must give byte-identical outputs to index_shards=0 on the toy benchmark
# ---------------------------------------------------------------------------------------------

from test_evaluate import _planted_cfg, planted  # noqa: E402,F401  (fixture: planted embeddings)
from test_mine import EMBED, shared  # noqa: E402,F401  (fixture: the toy train subset)


def test_evaluation_identical_with_two_shards(ray_cluster, planted):  # noqa: F811
    from umarvel_ray.eval.embeddings import EmbeddingSet
    from umarvel_ray.eval.evaluate import evaluate_stage
    from umarvel_ray.eval.plan import plan_tasks
    from umarvel_ray.eval.report import run_path

    tasks = ["mscoco_task0", "webqa_task1", "nights_task4"]
    emb = EmbeddingSet([planted["queries"]], planted["global"])
    reports, outs = {}, {}
    for shards in (0, 2, 2):  # the second 2-shard run loads the saved sharded indexes
        outs[shards] = planted["tmp"] / f"out-shards{shards}"
        cfg = _planted_cfg(planted, outs[shards], tasks=tasks, index_shards=shards, index_shard_cpus=0.5)
        reports.setdefault(shards, []).append(evaluate_stage(cfg, plan_tasks(cfg), emb))
    (single,), (built, reused) = reports[0], reports[2]
    assert len(built["indexes_built"]) == 4 and len(reused["indexes_reused"]) == 4
    assert (outs[2] / "index" / "global.shard-00001.faiss").is_file()  # saved by the shard actors
    n_runs = 0
    for t in tasks:
        for pool in ("local", "global"):
            ref = run_path(outs[0], t, pool).read_bytes()
            assert run_path(outs[2], t, pool).read_bytes() == ref  # ids, order and scores
            n_runs += 1
    assert n_runs == 6
    for rep in (built, reused):
        assert rep["averages"] == single["averages"]
        assert {t: {p: m.__dict__ for p, m in r.items()} for t, r in rep["results"].items()} == {
            t: {p: m.__dict__ for p, m in r.items()} for t, r in single["results"].items()
        }


@pytest.mark.slow
def test_mining_and_teacher_retrieval_identical_with_two_shards(
    ray_cluster,
    tiny_model_dir,
    toy_mbeir_dir,
    shared,  # noqa: F811
    tmp_path,
):
    from umarvel_ray.data.queries import read_query_meta
    from umarvel_ray.embed.config import EmbedConfig
    from umarvel_ray.index.local_pool import retrieve_local
    from umarvel_ray.mine.config import MineConfig
    from umarvel_ray.mine.run import run_mining

    def mine(shards: int, strategy: str):
        return run_mining(
            MineConfig(
                data_root=str(toy_mbeir_dir),
                model=str(tiny_model_dir),
                output_dir=str(tmp_path / f"mine-{strategy}-{shards}"),
                query_file=str(shared["queries"]),
                pool_file=str(shared["pool"]),
                pool_embeddings=str(shared["pool_emb"]),
                query_embeddings=str(tmp_path / "q_emb"),
                strategy=strategy,
                depth=50,
                embed=EmbedConfig(**EMBED),
                index_shards=shards,
                index_shard_cpus=0.5,
            )
        )

    for strategy in ("umarvel", "mmembed"):
        one, two = mine(0, strategy), mine(2, strategy)
        assert two.counts == one.counts and one.counts["queries_written"] > 0
        assert two.negatives_path.read_bytes() == one.negatives_path.read_bytes()
    # Teacher scoring's retrieval over each task's local pool (row filter on the shard actors).
    metas = list(read_query_meta(shared["queries"])[0].values())
    found = {}
    for shards in (0, 2):
        got, no_pool = retrieve_local(
            metas, tmp_path / "q_emb", shared["pool_emb"], 7, "auto", "cpu", shards, 0.5
        )
        found[shards] = ([(q.meta.qid, q.candidates, q.cos) for q in got], no_pool)
    assert found[2] == found[0] and len(found[0][0]) == len(metas) - len(found[0][1]) > 0


@pytest.mark.slow
def test_served_search_with_two_shards(ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path):
    """The Retriever with index_shards=2 answers /v1/search exactly like the saved index searched in
    one process with the served query vector (/v1/embed), and its shard actors go with the app."""
    import base64

    requests = pytest.importorskip("requests")
    from serve_fixtures import build_pool, serve_app, small_args

    setup = build_pool(tmp_path / "pool", tiny_model_dir, toy_mbeir_dir)
    index = load_index(setup["index_dir"] / "pool")
    instruction = "Retrieve a passage that answers the question."
    queries = [{"text": t, "instruction": instruction} for t in ("purple triangle?", "a red circle", "blue")]
    before = ray_cluster.available_resources().get("CPU", 0.0)
    args = small_args(tiny_model_dir, setup, reranker_dir="", index_shards=2, index_shard_cpus=0.25)
    with serve_app(args, name="umarvel_sharded") as url:
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["index_size"] == len(setup["ids"]), health
        for q in queries:
            emb = requests.post(
                f"{url}/v1/embed", json={"items": [q], "encoding_format": "base64"}, timeout=60
            )
            vec = np.frombuffer(base64.b64decode(emb.json()["data"][0]["embedding"]), "<f4")[None, :]
            ref_s, ref_i = index.search(vec, 12)
            body = requests.post(f"{url}/v1/search", json={"query": q, "k": 12}, timeout=60).json()
            assert [r["id"] for r in body["results"]] == ref_i[0], (q, body)
            assert [r["score"] for r in body["results"]] == [float(x) for x in ref_s[0]], q
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0.0) < before and time.monotonic() < deadline:
        time.sleep(0.5)
    after = ray_cluster.available_resources().get("CPU", 0.0)
    assert after >= before, (before, after)  # replica and shard actors gone
