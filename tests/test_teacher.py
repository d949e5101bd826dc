"""Distillation teacher: stratified sampling, local pools, cos + w * P(Yes), restart by shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umarvel_ray.data import catalogue, mbeir
from umarvel_ray.data.artefacts import read_teacher
from umarvel_ray.data.queries import read_query_meta
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.index.local_pool import local_pool_mask
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.teacher.run import run_teacher_scoring
from umarvel_ray.teacher.sample import stratified_sample
from umarvel_ray.teacher.scores import task_weight, teacher_scores

# Same settings and shared files as tests/test_mine.py (the pool is embedded once per session).
EMBED = {"actor_num_cpus": 0.5, "decode_num_cpus": 0.25, "batch_size": 16, "chunk_rows": 64}


def make_shared_inputs(toy: Path, base: Path) -> tuple[Path, Path]:
    """Identical to tests/test_mine.py::make_shared_inputs (kept in sync by hand)."""
    base.mkdir(parents=True, exist_ok=True)
    qpath, ppath = base / "train_queries.jsonl", base / "train_pool.jsonl"
    if qpath.is_file() and ppath.is_file():
        return qpath, ppath
    per_task: dict[tuple[str, int], int] = {}
    qlines, wanted = [], set()
    for line in (toy / mbeir.TRAIN_QUERY_FILE).read_text().splitlines(keepends=True):
        q = json.loads(line)
        key = (q["qid"].split(":")[0], q["task_id"])
        if per_task.get(key, 0) < 3:
            per_task[key] = per_task.get(key, 0) + 1
            qlines.append(line)
            wanted |= set(q["pos_cand_list"])
    groups: dict[tuple[str, str], int] = {}
    plines = []
    for line in (toy / mbeir.TRAIN_POOL_FILE).read_text().splitlines(keepends=True):
        c = json.loads(line)
        key = (c["did"].split(":")[0], c["modality"])
        if c["did"] in wanted or groups.get(key, 0) < 5:
            groups[key] = groups.get(key, 0) + (c["did"] not in wanted)
            plines.append(line)
    (base / "tmp_q").write_text("".join(qlines))
    (base / "tmp_p").write_text("".join(plines))
    (base / "tmp_q").rename(qpath)
    (base / "tmp_p").rename(ppath)
    return qpath, ppath


@pytest.fixture(scope="module")
def shared(toy_mbeir_dir, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "mine_teacher_shared"
    q, p = make_shared_inputs(Path(toy_mbeir_dir), base)
    return {"queries": q, "pool": p, "pool_emb": base / "pool_emb_tiny"}


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_stratified_sample_per_task(toy_mbeir_dir):
    metas, _, n_read, invalid = read_query_meta(Path(toy_mbeir_dir) / mbeir.TRAIN_QUERY_FILE)
    assert invalid == 0 and len(metas) == n_read
    sizes: dict[str, int] = {}
    for m in metas.values():
        sizes[m.task] = sizes.get(m.task, 0) + 1
    assert len(sizes) == 16 and set(sizes) == {t.name for t in catalogue.MBEIR_TASKS}

    s = stratified_sample(metas, 0.1, seed=0)
    assert set(s) == set(sizes)
    for task, qids in s.items():
        assert len(qids) == round(0.1 * sizes[task])
        assert len(set(qids)) == len(qids)
        assert all(metas[q].task == task for q in qids)
    assert stratified_sample(metas, 0.1, seed=0) == s  # deterministic
    assert stratified_sample(metas, 0.1, seed=1) != s  # the seed matters
    tiny = stratified_sample(metas, 0.001, seed=0)
    assert {len(q) for q in tiny.values()} == {1}  # at least one per task
    capped = stratified_sample(metas, 0.5, seed=0, max_per_task=3)
    assert {len(q) for q in capped.values()} == {3}
    # a task's draw does not depend on the other tasks being present
    one_task = {q: m for q, m in metas.items() if m.task == "mscoco_task0"}
    assert stratified_sample(one_task, 0.1, seed=0)["mscoco_task0"] == s["mscoco_task0"]


def test_local_pool_mask_and_weights():
    ds = np.array([9, 9, 9, 0, 9])
    mod = np.array(["image", "text", "image", "image", "image,text"])
    assert local_pool_mask(ds, mod, 9, 0).tolist() == [True, False, True, False, False]  # MSCOCO t->i
    assert local_pool_mask(ds, mod, 9, 3).tolist() == [False, True, False, False, False]  # MSCOCO i->t
    weights = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}
    assert task_weight("mscoco_task0", 1.0, weights) == 0.5
    assert task_weight("mscoco_task3", 1.0, weights) == 0.1
    assert task_weight("cirr_task7", 1.0, weights) == 1.0
    assert teacher_scores([0.5, 0.25], [1.0, 0.5], 0.1) == [0.5 + 0.1 * 1.0, 0.25 + 0.1 * 0.5]
    assert teacher_scores([0.5, 0.25], None, 0.1) == [0.5, 0.25]


# ---------------------------------------------------------------------------------------------
# Full path on the toy benchmark (embedding, local retrieval, re-ranker actors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_end_to_end(ray_cluster, tiny_model_dir, toy_mbeir_dir, shared, tmp_path):
    from umarvel_ray.store import read_embeddings

    toy = Path(toy_mbeir_dir)
    pool = {json.loads(x)["did"]: json.loads(x) for x in shared["pool"].read_text().splitlines()}

    def cfg(out: Path, **kw) -> TeacherConfig:
        base = dict(
            data_root=str(toy),
            model=str(tiny_model_dir),
            reranker=str(tiny_model_dir),
            output_dir=str(out),
            pool_file=str(shared["pool"]),
            pool_embeddings=str(shared["pool_emb"]),
            query_embeddings=str(tmp_path / "q_emb"),
            max_per_task=1,
            top_k=4,
            shard_queries=8,
            pairs_per_batch=32,
            rerank_batch_size=16,
            actor_num_cpus=0.5,
            decode_num_cpus=0.25,
            embed=EmbedConfig(**EMBED),
        )
        return TeacherConfig(**{**base, **kw})

    res = run_teacher_scoring(cfg(tmp_path / "t1"))
    recs = read_teacher(res.teacher_path)
    metas, _, _, _ = read_query_meta(toy / mbeir.TRAIN_QUERY_FILE)
    sample = stratified_sample(metas, 0.1, seed=0, max_per_task=1)
    assert sorted(recs) == sorted(q for qids in sample.values() for q in qids)  # 1 per task, 16 tasks
    assert res.counts["queries_written"] == 16 and res.counts["pairs_rejected"] == 0
    assert res.counts["shards_written"] == 2 and res.counts["shards_skipped"] == 0
    lines = res.teacher_path.read_text().splitlines()
    assert [json.loads(x)["qid"] for x in lines] == sorted(recs, key=mbeir.split_id)

    q_emb = read_embeddings(tmp_path / "q_emb")
    p_emb = read_embeddings(shared["pool_emb"])
    qvec = dict(zip(q_emb.ids.tolist(), q_emb.vectors, strict=True))
    pvec = dict(zip(p_emb.ids.tolist(), p_emb.vectors, strict=True))
    weights = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}
    for qid, r in recs.items():
        m = metas[qid]
        target = catalogue.task_modalities(m.task_id)[1]
        local = [
            d for d, c in pool.items() if mbeir.split_id(d)[0] == m.dataset_id and c["modality"] == target
        ]
        assert len(r["candidates"]) == min(4, len(local)) > 0
        assert set(r["candidates"]) <= set(local)  # only the task's local pool
        assert r["weight"] == weights.get(m.task, 1.0)
        assert all(0.0 <= p <= 1.0 for p in r["p_yes"])
        assert r["scores"] == [c + r["weight"] * p for c, p in zip(r["cos"], r["p_yes"], strict=True)]
        assert r["cos"] == sorted(r["cos"], reverse=True)
        for d, c in zip(r["candidates"], r["cos"], strict=True):
            assert abs(float(qvec[qid] @ pvec[d]) - c) < 1e-5
        best_local = max(float(qvec[qid] @ pvec[d]) for d in local)
        assert abs(r["cos"][0] - best_local) < 1e-5
    assert {recs[q]["task"] for q in recs} == {t.name for t in catalogue.MBEIR_TASKS}

    # The actors' P(Yes) is Reranker.score of the same pair built by the same decoding rule.
    from umarvel_ray.data.artefacts import read_teacher_quality
    from umarvel_ray.embed import decode
    from umarvel_ray.model.reranker import Reranker
    from umarvel_ray.teacher.quality import teacher_quality

    reranker = Reranker.load(str(tiny_model_dir))
    px = (reranker.cfg.inputs.min_pixels, reranker.cfg.inputs.max_pixels)
    instr = str(toy / "instructions/query_instructions.tsv")
    q_lines = {json.loads(x)["qid"]: x for x in (toy / mbeir.TRAIN_QUERY_FILE).read_text().splitlines()}
    for qid in sorted(recs)[:3]:
        q_item = decode.parse_row(q_lines[qid].encode(), "query", str(toy), instr, None, 0, *px)[1]
        pairs = [
            (q_item, decode.parse_row(json.dumps(pool[d]).encode(), "candidate", str(toy), instr, None, 0, *px)[1])
            for d in recs[qid]["candidates"]
        ]
        np.testing.assert_allclose(reranker.score(pairs), recs[qid]["p_yes"], atol=1e-5)
    quality = read_teacher_quality(res.teacher_path)
    positives = {q: metas[q].positives for q in recs}
    assert quality == teacher_quality(list(recs.values()), positives, held_out=False)

    # Restart: a lost shard is re-scored, the other is reused; the output does not change.
    shard0 = tmp_path / "t1" / "_shards" / "teacher-00000.json"
    shard0.unlink()
    res2 = run_teacher_scoring(cfg(tmp_path / "t1"))
    assert res2.counts["shards_written"] == 1 and res2.counts["shards_skipped"] == 1
    assert res2.teacher_path.read_bytes() == res.teacher_path.read_bytes()

    # No re-ranker: the teacher is cos only, and the summary says so.
    res3 = run_teacher_scoring(cfg(tmp_path / "t3", reranker=None))
    cos_only = read_teacher(res3.teacher_path)
    assert set(cos_only) == set(recs)
    for qid, r in cos_only.items():
        assert r["p_yes"] is None and r["scores"] == r["cos"] == recs[qid]["cos"]
    summary = json.loads((tmp_path / "t3" / "summary.json").read_text())
    assert summary["counts"]["reranker"].startswith("none") and "no re-ranker" in summary["teacher"]


def test_config_errors(toy_mbeir_dir, tmp_path):
    import importlib.util

    from umarvel_ray.config import ConfigError
    from umarvel_ray.teacher.config import validate_config

    ok = {"data_root": str(toy_mbeir_dir), "output_dir": str(tmp_path)}
    validate_config(TeacherConfig(**ok))
    for bad, match in (
        ({"fraction": 0.0}, "fraction"),
        ({"top_k": 0}, "top_k"),
        ({"reranker": "/nope"}, "reranker"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate_config(TeacherConfig(**ok, **bad))
    spec = importlib.util.spec_from_file_location(
        "job_teacher_scores", Path(__file__).resolve().parents[1] / "jobs" / "teacher_scores.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([f"data_root={toy_mbeir_dir}", f"output_dir={tmp_path}", "fraction=2"]) == 2
