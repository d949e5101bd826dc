"""M-BEIR evaluation: planted embeddings test search + metrics alone; the tiny model runs the whole
embed -> index -> evaluate path through the shared local Ray on a 3-task cut of the toy benchmark
(and, marked slow, on all 16 tasks)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from umarvel_ray.data.catalogue import MBEIR_TASKS, TASKS_BY_NAME
from umarvel_ray.data.mbeir import GLOBAL_POOL_FILE, read_dids, read_qids, read_qrels
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.eval.embeddings import (
    EmbeddingSet,
    embed_input,
    group_query_tasks,
    pool_ids_seen,
    tasks_needing_local_embedding,
)
from umarvel_ray.eval.evaluate import evaluate_stage, run_evaluation
from umarvel_ray.eval.plan import EvalConfig, TaskPlan, plan_tasks
from umarvel_ray.eval.report import read_trec_run, run_path
from umarvel_ray.index import load_index
from umarvel_ray.store import shard_name, write_manifest, write_shard

JOBS = Path(__file__).resolve().parents[1] / "jobs"
MINI_TASKS = ["mscoco_task0", "webqa_task1", "nights_task4"]  # t->i, t->t, i->i


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _copy_root(
    src: Path, dst: Path, tasks: list[str], link_images: bool = False, union: bool = False
) -> Path:
    """A data root with only `tasks`' files; `union`: global pool = concatenation of their local pools."""
    for name in tasks:
        t = TASKS_BY_NAME[name]
        for rel in (t.query_file, t.qrels_file, t.pool_file):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, dst / rel)
    (dst / "instructions").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "instructions/query_instructions.tsv", dst / "instructions/query_instructions.tsv")
    g = dst / GLOBAL_POOL_FILE
    g.parent.mkdir(parents=True, exist_ok=True)
    if union:
        g.write_text("".join((src / TASKS_BY_NAME[n].pool_file).read_text() for n in tasks))
    else:
        shutil.copy(src / GLOBAL_POOL_FILE, g)
    if link_images:
        (dst / "mbeir_images").symlink_to(src / "mbeir_images")
    return dst


def _write_emb(
    directory: Path, ids: list[str], vectors: np.ndarray, kind: str, shard_rows: int = 500
) -> Path:
    """Hand-written embedding directory in the pipeline's format (shards + complete manifest)."""
    for s, start in enumerate(range(0, len(ids), shard_rows)):
        write_shard(
            directory / shard_name(s),
            ids[start : start + shard_rows],
            None,
            vectors[start : start + shard_rows],
        )
    write_manifest(
        directory, {"kind": kind, "dim": int(vectors.shape[1]), "rows_out": len(ids), "complete": True}
    )
    return directory


# ---------------------------------------------------------------------------------------------
# Planted embeddings: search + metrics without the model
# ---------------------------------------------------------------------------------------------

NEGATIVE_TASK = "cirr_task7"  # its queries get a non-positive's vector: hit@1 must be 0
UNREACHABLE_TASK = "webqa_task1"  # one query's positive is removed from the local pool file


@pytest.fixture(scope="module")
def planted(toy_mbeir_dir, tmp_path_factory):
    """Data root (edis_task2 query file and oven_task6 local pool removed) + planted embeddings:
    every query vector equals the vector of one of its positives (random unit vectors per did)."""
    tmp = tmp_path_factory.mktemp("planted")
    names = [t.name for t in MBEIR_TASKS]
    root = _copy_root(Path(toy_mbeir_dir), tmp / "root", names)
    (root / TASKS_BY_NAME["edis_task2"].query_file).unlink()
    (root / TASKS_BY_NAME["oven_task6"].pool_file).unlink()
    # The only positive of UNREACHABLE_TASK's first query leaves its local pool (not the global one).
    t = TASKS_BY_NAME[UNREACHABLE_TASK]
    first = read_qids(root / t.query_file)[0]
    (gone,) = read_qrels(root / t.qrels_file)[first]
    pool = root / t.pool_file
    pool.write_text("".join(x for x in pool.read_text().splitlines(True) if json.loads(x)["did"] != gone))
    gids = read_dids(root / GLOBAL_POOL_FILE)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((len(gids), 32)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    row = {d: i for i, d in enumerate(gids)}
    qids, qvecs = [], []
    for name in names:
        t = TASKS_BY_NAME[name]
        qf = Path(toy_mbeir_dir) / t.query_file
        qrels = read_qrels(Path(toy_mbeir_dir) / t.qrels_file)
        local = read_dids(Path(toy_mbeir_dir) / t.pool_file)
        for q in read_qids(qf):
            negatives = (d for d in local if d not in qrels[q])
            target = next(negatives) if name == NEGATIVE_TASK else sorted(qrels[q])[0]
            qids.append(q)
            qvecs.append(g[row[target]])
    emb = tmp / "emb"
    qdir = _write_emb(emb / "queries", qids, np.stack(qvecs), "query", shard_rows=300)
    gdir = _write_emb(emb / "pool-global", gids, g, "candidate", shard_rows=500)  # 7 shards
    return {"root": root, "queries": qdir, "global": gdir, "tmp": tmp}


def _planted_cfg(planted, out: Path, **kw) -> EvalConfig:
    return EvalConfig(data_root=str(planted["root"]), model="unused", out_dir=str(out), **kw)


def test_planted_embeddings_score_one(planted, toy_mbeir_dir):
    out = planted["tmp"] / "out"
    cfg = _planted_cfg(planted, out)
    plan = plan_tasks(cfg)
    # Missing files: the task is skipped, the missing local pool only drops that pool; no crash.
    assert "edis_task2" in plan.skipped and "query file missing" in plan.skipped["edis_task2"]
    assert "oven_task6/local" in plan.skipped
    assert len(plan.tasks) == 15 and plan.depth == 10
    rep = evaluate_stage(cfg, plan, EmbeddingSet([planted["queries"]], planted["global"]))
    res = rep["results"]
    assert set(res) == {t.name for t in MBEIR_TASKS} - {"edis_task2"}
    assert set(res["oven_task6"]) == {"global"}
    for name, pools in res.items():
        t = TASKS_BY_NAME[name]
        n_file = _lines(Path(toy_mbeir_dir) / t.query_file)
        for pool, m in pools.items():
            assert m.n_queries == n_file and m.n_missing_from_run == 0
            if name == UNREACHABLE_TASK and pool == "local":
                assert m.n_unreachable == 1 and m.hit == (n_file - 1) / n_file, m
            elif name == NEGATIVE_TASK:
                assert m.n_unreachable == 0
                assert m.hits_at[1] == 0.0, (name, pool)  # the planted non-positive ranks first
            else:
                assert m.n_unreachable == 0 and m.hit == 1.0 and m.mrr == 1.0, (name, pool, m)
            if pool == "local":
                assert rep["tasks"][name]["settings"]["local"]["source"] == "global-subset"
                assert rep["tasks"][name]["settings"]["local"]["pool_size"] == _lines(
                    planted["root"] / t.pool_file
                )
            run = read_trec_run(run_path(out, name, pool))
            assert len(run) == n_file and all(len(r) == 10 for r in run.values())
    lines = run_path(out, "mscoco_task0", "local").read_text().splitlines()
    assert [int(x.split()[3]) for x in lines[:10]] == list(range(1, 11))
    # Report files: 16-row table, partial-run label, skipped tasks recorded.
    md = Path(rep["paths"]["markdown"]).read_text()
    assert all(f"| {t.label} |" in md for t in MBEIR_TASKS) and "14/16" in md
    data = json.loads(Path(rep["paths"]["json"]).read_text())
    assert data["averages"]["global"]["n_tasks"] == 15 and data["averages"]["local"]["n_tasks"] == 14
    assert "edis_task2" in data["settings"]["skipped"]
    assert data["settings"]["instruction"] == {"mode": "random", "seed": 0, "file": cfg.embed.instructions}
    assert "SUMMARY evaluate" in rep["summary"] and "indexes_built=15" in rep["summary"]


def test_planted_rerun_reuses_indexes_and_rebuilds_on_change(planted):
    out = planted["tmp"] / "out-reuse"
    cfg = _planted_cfg(planted, out, tasks=["mscoco_task0", "nights_task4"])
    emb = EmbeddingSet([planted["queries"]], planted["global"])
    first = evaluate_stage(cfg, plan_tasks(cfg), emb)
    assert len(first["indexes_built"]) == 3 and not first["indexes_reused"]
    faiss_files = sorted((out / "index").rglob("*.faiss"))
    assert len(faiss_files) == 3
    mtimes = [p.stat().st_mtime_ns for p in faiss_files]
    second = evaluate_stage(cfg, plan_tasks(cfg), emb)
    assert not second["indexes_built"] and len(second["indexes_reused"]) == 3
    assert [p.stat().st_mtime_ns for p in faiss_files] == mtimes
    assert second["averages"] == first["averages"]
    # Other index settings (fp16 storage) must not be served from the old files.
    cfg2 = _planted_cfg(planted, out, tasks=["mscoco_task0", "nights_task4"], fp16=True)
    third = evaluate_stage(cfg2, plan_tasks(cfg2), emb)
    assert len(third["indexes_built"]) == 3


def test_build_index_job_subsets_global_embeddings(planted, toy_mbeir_dir):
    job = _job("build_index")
    pool = Path(toy_mbeir_dir) / TASKS_BY_NAME["nights_task4"].pool_file
    out = planted["tmp"] / "job-index" / "nights"
    argv = [f"embeddings={planted['global']}", f"output={out}", f"subset_pool={pool}"]
    assert job.main(argv) == 0
    index = load_index(out)
    assert sorted(index.ids.tolist()) == sorted(read_dids(pool))
    assert (out.parent / "nights.config.yaml").is_file()
    assert job.main([f"embeddings={planted['global']}", f"output={out}-all"]) == 0
    assert len(load_index(f"{out}-all")) == _lines(Path(toy_mbeir_dir) / GLOBAL_POOL_FILE)
    bad = planted["tmp"] / "bad-pool.jsonl"
    bad.write_text(
        pool.read_text()
        + json.dumps({"did": "4:999999", "txt": None, "img_path": "x.png", "modality": "image"})
        + "\n"
    )
    assert job.main([f"embeddings={planted['global']}", f"output={out}-bad", f"subset_pool={bad}"]) == 1
    assert job.main([f"embeddings={planted['tmp'] / 'nope'}", f"output={out}"]) == 2


def test_local_pool_not_in_global_needs_its_own_embedding(planted):
    cfg = _planted_cfg(planted, planted["tmp"] / "out-x", tasks=["mscoco_task0", "nights_task4"])
    plan = plan_tasks(cfg)
    gids = read_dids(planted["root"] / GLOBAL_POOL_FILE)
    assert tasks_needing_local_embedding(plan.tasks, gids) == []
    dropped = read_dids(planted["root"] / TASKS_BY_NAME["nights_task4"].pool_file)[7]
    assert tasks_needing_local_embedding(plan.tasks, [d for d in gids if d != dropped]) == ["nights_task4"]
    # A row the global run rejected counts as seen: embedding the local file would reject it again.
    d = planted["tmp"] / "global-with-reject"
    keep = [i for i, x in enumerate(gids) if x != dropped]
    _write_emb(d, [gids[i] for i in keep], np.eye(len(gids), 8, dtype=np.float32)[keep] + 1, "candidate")
    assert dropped not in pool_ids_seen(d)
    (d / "rejects.jsonl").write_text(
        json.dumps({"id": dropped, "field": "img_path", "reason": "missing"}) + "\n"
    )
    assert tasks_needing_local_embedding(plan.tasks, pool_ids_seen(d)) == []


def test_query_groups_never_mix_colliding_qids():
    spec = TASKS_BY_NAME
    a = TaskPlan(spec["mscoco_task0"], Path("a"), Path("a"), None, ["9:1", "9:2"], ["local"])
    b = TaskPlan(spec["mscoco_task3"], Path("b"), Path("b"), None, ["9:2", "9:3"], ["local"])
    c = TaskPlan(spec["cirr_task7"], Path("c"), Path("c"), None, ["8:1"], ["local"])
    groups = group_query_tasks([a, b, c])
    assert [[t.name for t in g] for g in groups] == [["mscoco_task0", "cirr_task7"], ["mscoco_task3"]]
    assert len(group_query_tasks([a, b, c], combine=False)) == 3


def test_bad_config_is_rejected(planted):
    from umarvel_ray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task"):
        plan_tasks(_planted_cfg(planted, planted["tmp"] / "o", tasks=["mscoco_task9"]))
    with pytest.raises(ConfigError, match="pools"):
        plan_tasks(_planted_cfg(planted, planted["tmp"] / "o", pools=["both"]))
    with pytest.raises(ConfigError, match="instruction"):
        plan_tasks(_planted_cfg(planted, planted["tmp"] / "o", embed=EmbedConfig(prompt_index=-1)))


# ---------------------------------------------------------------------------------------------
# The real path: tiny model, Ray Data embedding, faiss, metrics
# ---------------------------------------------------------------------------------------------


def _ray_cfg(root: Path, model: Path, out: Path, **kw) -> EvalConfig:
    base = dict(
        data_root=str(root),
        model=str(model),
        out_dir=str(out),
        embed=EmbedConfig(batch_size=64, actor_num_cpus=0.5, decode_num_cpus=0.25, use_gpu="false", shard_rows=250),
        index_device="cpu",
    )
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def mini(ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path_factory):
    """First evaluation of 3 tasks (global pool = union of their local pools) and its timing."""
    tmp = tmp_path_factory.mktemp("eval_mini")
    root = _copy_root(Path(toy_mbeir_dir), tmp / "root", MINI_TASKS, link_images=True, union=True)
    cfg = _ray_cfg(root, Path(tiny_model_dir), tmp / "out")
    t0 = time.perf_counter()
    report = run_evaluation(cfg)
    print(f"mini evaluation (3 tasks, 2 embedding pipelines): {time.perf_counter() - t0:.1f}s")
    return {"cfg": cfg, "root": root, "report": report, "seconds": time.perf_counter() - t0, "tmp": tmp}


@pytest.mark.ray
def test_mini_end_to_end_report(mini):
    rep, cfg, root = mini["report"], mini["cfg"], mini["root"]
    out = Path(cfg.out_dir)
    assert len(rep["embedded"]) == 2 and "pool-global" in rep["embedded"]
    assert any(n.startswith("queries-3tasks") for n in rep["embedded"])  # one query pipeline
    assert not (out / "embeddings" / "pool-local-mscoco_task0").exists()  # local pools not re-embedded
    assert set(rep["results"]) == set(MINI_TASKS)
    for name in MINI_TASKS:
        t = TASKS_BY_NAME[name]
        n_file = _lines(root / t.query_file)
        assert rep["tasks"][name]["settings"]["local"]["source"] == "global-subset"
        for pool in ("local", "global"):
            m = rep["results"][name][pool]
            assert 0.0 <= m.hit <= 1.0 and 0.0 <= m.mrr <= 1.0 and m.k == t.k
            assert m.n_queries == n_file and m.n_missing_from_run == 0
            assert m.hits_at[1] <= m.hits_at[5] <= m.hits_at[10]
            lines = run_path(out, name, pool).read_text().splitlines()
            assert len(lines) == 10 * n_file
            for q in range(n_file):
                assert [int(x.split()[3]) for x in lines[10 * q : 10 * q + 10]] == list(range(1, 11))
    for pool in ("local", "global"):
        avg = rep["averages"][pool]
        assert avg["n_tasks"] == 3 and 0.0 <= avg["value"] <= 1.0
    assert (out / "config.yaml").is_file() and (out / "mbeir.md").is_file()
    assert "SUMMARY evaluate" in rep["summary"]


@pytest.mark.ray
def test_mini_rerun_reuses_embeddings_and_indexes(mini):
    out = Path(mini["cfg"].out_dir)
    manifests = sorted((out / "embeddings").glob("*/manifest.json"))
    assert len(manifests) == 2
    before = [p.stat().st_mtime_ns for p in manifests]
    t0 = time.perf_counter()
    again = run_evaluation(mini["cfg"])
    seconds = time.perf_counter() - t0
    assert again["embedded"] == [] and len(again["reused_embeddings"]) == 2
    assert again["indexes_built"] == [] and len(again["indexes_reused"]) == 4
    assert [p.stat().st_mtime_ns for p in manifests] == before
    assert again["averages"] == mini["report"]["averages"]
    assert seconds < mini["seconds"]


@pytest.mark.ray
def test_mini_local_index_from_global_subset_equals_own_pool_embedding(mini):
    """mscoco_task0's local index cut out of the global embeddings ranks exactly like an index over
    that pool embedded on its own."""
    cfg = mini["cfg"]
    name = "mscoco_task0"
    out_c = mini["tmp"] / "out-own-pool"
    cfg_c = _ray_cfg(
        mini["root"], Path(cfg.model), out_c, tasks=[name], pools=["local"], local_source="local"
    )
    plan = plan_tasks(cfg_c)
    emb = EmbeddingSet(
        queries=sorted(p.parent for p in (Path(cfg.out_dir) / "embeddings").glob("queries-*/manifest.json"))
    )
    pool_file = mini["root"] / TASKS_BY_NAME[name].pool_file
    emb.local_pools[name] = embed_input(cfg_c, f"pool-local-{name}", pool_file, "candidate", emb)
    rep = evaluate_stage(cfg_c, plan, emb)
    assert rep["tasks"][name]["settings"]["local"]["source"] == "local-embedding"
    subset_run = read_trec_run(run_path(cfg.out_dir, name, "local"))
    own_run = read_trec_run(run_path(out_c, name, "local"))
    assert subset_run.keys() == own_run.keys()
    for qid in subset_run:
        assert [d for d, _ in subset_run[qid]] == [d for d, _ in own_run[qid]], qid
        np.testing.assert_allclose([s for _, s in subset_run[qid]], [s for _, s in own_run[qid]], atol=1e-5)
    assert rep["results"][name]["local"] == mini["report"]["results"][name]["local"]


@pytest.mark.ray
@pytest.mark.slow
def test_full_toy_all_16_tasks_via_job(ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path, capsys):
    out = tmp_path / "out"
    job = _job("evaluate")
    argv = [
        f"data_root={toy_mbeir_dir}",
        f"model={tiny_model_dir}",
        f"out_dir={out}",
        "embed.batch_size=64",
        "embed.actor_num_cpus=0.5",
        "embed.decode_num_cpus=0.25",
        "embed.use_gpu=false",
        "index_device=cpu",
    ]
    assert job.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "mbeir.json").read_text())
    assert data["order"] == [t.name for t in MBEIR_TASKS]
    for t in MBEIR_TASKS:
        n_file = _lines(Path(toy_mbeir_dir) / t.query_file)
        for pool in ("local", "global"):
            m = data["tasks"][t.name][pool]
            assert 0.0 <= m["hit"] <= 1.0 and m["n_queries"] == n_file
    for pool in ("local", "global"):
        assert data["averages"][pool]["n_tasks"] == 16
    assert "avg of 16" in (out / "mbeir.md").read_text()
    summary = [line for line in printed.splitlines() if line.startswith("SUMMARY evaluate")]
    assert len(summary) == 1 and "local_avg=" in summary[0]
    print(summary[0])
