"""Reranking at evaluation (rerank=umarvel+|zeroshot): the fusion rule, its config checks, and a
reranked evaluation of a 2-task toy cut through real Ray Data re-ranker actors, checked against
`Reranker.score` run directly on the same pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import _copy_root, _ray_cfg

from umarvel_ray.config import ConfigError
from umarvel_ray.data.catalogue import TASKS_BY_NAME
from umarvel_ray.data.mbeir import read_qrels
from umarvel_ray.data.rows import parse_row
from umarvel_ray.eval.evaluate import run_evaluation
from umarvel_ray.eval.metrics import evaluate_run
from umarvel_ray.eval.plan import EvalConfig, plan_tasks
from umarvel_ray.eval.report import read_trec_run, run_path
from umarvel_ray.eval.rerank import order_head
from umarvel_ray.model.fusion import fused_scores, rank_fused, task_weight
from umarvel_ray.rerank.config import PairPoolConfig
from umarvel_ray.rerank.offsets import read_at, scan_offsets

TASKS = ["webqa_task1", "mscoco_task0"]  # t->t (no images) and t->i
K = 10  # = the search depth (max of k=[1,5,10] and R@5): the first-stage run file is the head
W = 1000.0  # makes the tiny re-ranker's small P(Yes) differences decide the order


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_fused_scores_exact_and_per_task_weight():
    assert fused_scores([0.25, 0.5, -0.125], [0.5, 0.25, 1.0], 0.5) == [0.5, 0.625, 0.375]
    assert fused_scores([0.25], [0.5], 0.0) == [0.25]
    with pytest.raises(ValueError, match="2 cosines for 1 rerank scores"):
        fused_scores([0.1, 0.2], [0.5], 1.0)
    weights = {"mscoco_task0": 0.5}
    assert task_weight("mscoco_task0", 0.1, weights) == 0.5
    assert task_weight("webqa_task1", 0.1, weights) == 0.1
    # w decides the order: cos wins at w=0.1, P(Yes) at w=0.5 (ties by id ascending).
    cos, p = [0.5, 0.25, 0.25], [0.0, 0.75, 0.75]
    assert rank_fused(["a", "c", "b"], cos, p, 0.1) == [0, 2, 1]  # 0.5 > 0.325 = 0.325 (b < c)
    assert rank_fused(["a", "c", "b"], cos, p, 0.5) == [2, 1, 0]  # 0.625 = 0.625 > 0.5


def test_order_head_rules():
    head = [("d1", 0.5), ("d2", 0.25), ("d3", 0.125)]
    # umarvel+: cos + w * P(Yes), exact; a rejected pair (None) counts as P = 0.
    got = order_head("umarvel+", head, [0.0, 0.75, None], 0.5)
    assert got == [("d2", 0.625), ("d1", 0.5), ("d3", 0.125)]
    # zeroshot: P(True) alone; ties by cos, then id; rejected last.
    got = order_head("zeroshot", head, [0.25, 0.25, None], 0.5)
    assert got == [("d1", 0.25), ("d2", 0.25), ("d3", 0.0)]
    got = order_head("zeroshot", head, [0.125, 0.75, 0.5], 123.0)  # w is ignored
    assert got == [("d2", 0.75), ("d3", 0.5), ("d1", 0.125)]


def test_teacher_and_serve_use_the_one_fusion(monkeypatch):
    from umarvel_ray.serve import fusion as serve_fusion
    from umarvel_ray.teacher import scores as teacher_scores_mod

    assert serve_fusion.fuse is fused_scores and serve_fusion.rank_fused is rank_fused
    assert teacher_scores_mod.task_weight is task_weight
    calls = []

    def spy(cos, p, w):
        calls.append((list(cos), list(p), w))
        return fused_scores(cos, p, w)

    monkeypatch.setattr(teacher_scores_mod, "fused_scores", spy)
    assert teacher_scores_mod.teacher_scores([0.25, 0.5], [0.5, 0.25], 2.0) == [1.25, 1.0]
    assert calls == [([0.25, 0.5], [0.5, 0.25], 2.0)]
    assert teacher_scores_mod.teacher_scores([0.25], None, 2.0) == [0.25]


def test_actor_reads_all_none_columns_as_none_not_nan_text():
    """Through Arrow a column that is None in every row of a block arrives as float NaN: the actor
    must read it as "no text" / "no image", not as the candidate text "nan" (it did, until the
    evaluation's check against `Reranker.score` caught it on image-only candidates)."""
    from umarvel_ray.rerank.actor import RerankActor

    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    nan = np.array([np.nan], dtype=np.float32)
    batch = {
        "q_text": np.array(["a red cross"], dtype=object),
        "q_instruction": nan,
        "q_image": nan,
        "q_h": np.array([0], np.int32),
        "q_w": np.array([0], np.int32),
        "c_text": nan,
        "c_image": np.array([img.tobytes()], dtype=object),
        "c_h": np.array([2], np.int32),
        "c_w": np.array([3], np.int32),
    }
    (q, c), = RerankActor._pairs(batch, np.array([0]))
    assert q["text"] == "a red cross" and q["instruction"] is None and q["image"] is None
    assert c["text"] is None and np.array_equal(c["image"], img)


# ---------------------------------------------------------------------------------------------
# Config checks (no Ray)
# ---------------------------------------------------------------------------------------------


def _fake_model(path: Path, meta: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    if meta:
        (path / "umarvel_reranker.json").write_text(json.dumps({"config": {}}))
    return path


def test_bad_rerank_config_is_rejected(toy_mbeir_dir, tmp_path):
    trained = _fake_model(tmp_path / "trained", meta=True)
    base = _fake_model(tmp_path / "base", meta=False)

    def plan(**kw):
        cfg = EvalConfig(data_root=str(toy_mbeir_dir), model=str(base), out_dir=str(tmp_path / "o"), tasks=TASKS, **kw)
        return plan_tasks(cfg)

    cases = [
        (dict(rerank="both"), r"rerank must be one of \('none', 'umarvel\+', 'zeroshot'\)"),
        (dict(rerank="umarvel+"), "rerank=umarvel\\+ needs rerank_model="),
        (dict(rerank="zeroshot"), "rerank=zeroshot needs rerank_model="),
        (dict(rerank="umarvel+", rerank_model=str(tmp_path / "nope")), "rerank_model: model directory"),
        (dict(rerank="umarvel+", rerank_model=str(base)), "needs a trained re-ranker"),
        (dict(rerank="zeroshot", rerank_model=str(trained)), "untrained base MLLM"),
        (dict(rerank="zeroshot", rerank_model=str(base), rerank_adapter=str(trained)), "untrained base MLLM"),
        (dict(rerank="umarvel+", rerank_model=str(trained), rerank_top_k=5), "rerank_top_k=5 is below the search depth 10"),
        (dict(rerank="umarvel+", rerank_model=str(trained), rerank_top_k=0), "rerank_top_k must be >= 1"),
        (dict(rerank="umarvel+", rerank_model=str(trained), rerank_batch_size=0), "rerank_batch_size must be >= 1"),
        (
            dict(rerank="umarvel+", rerank_model=str(trained), rerank_pool=PairPoolConfig(use_gpu="maybe")),
            "rerank_pool.use_gpu must be auto, true or false",
        ),
        (
            dict(rerank="umarvel+", rerank_model=str(trained), rerank_pool=PairPoolConfig(pairs_per_batch=0)),
            "rerank_pool.pairs_per_batch must be >= 1",
        ),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            plan(**kw)
    assert plan(rerank="umarvel+", rerank_model=str(trained), rerank_top_k=10).depth == 10
    assert plan(rerank="zeroshot", rerank_model=str(base)).depth == 10
    assert plan(rerank="none", rerank_model=None).depth == 10


def test_rerank_keys_load_from_yaml_and_resolve(tmp_path, monkeypatch):
    from umarvel_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    y = tmp_path / "c.yaml"
    y.write_text(
        "rerank: umarvel+\nrerank_model: runs/reranker/model\nrerank_top_k: 20\nrerank_weight: 0.25\n"
        "rerank_task_weights: {mscoco_task0: 0.5}\nrerank_pool: {num_actors: 2, use_gpu: 'false'}\n"
    )
    cfg = load_config(EvalConfig, str(y), ["rerank_batch_size=8"])
    assert cfg.rerank == "umarvel+" and cfg.rerank_top_k == 20 and cfg.rerank_weight == 0.25
    assert cfg.rerank_task_weights == {"mscoco_task0": 0.5} and cfg.rerank_batch_size == 8
    assert cfg.rerank_pool.num_actors == 2 and cfg.rerank_pool.use_gpu == "false"
    assert cfg.rerank_model == str(tmp_path / "runs/reranker/model")


# ---------------------------------------------------------------------------------------------
# Through Ray: tiny embedder, tiny re-ranker, 2 tasks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_model_dir, toy_mbeir_dir, tmp_path_factory):
    """A 2-task root (global = union of the local pools) and a 'trained' re-ranker: the tiny
    model saved by `Reranker.merge_and_save` (weights unchanged, umarvel_reranker.json written)."""
    from umarvel_ray.model.reranker import Reranker

    tmp = tmp_path_factory.mktemp("eval_rerank")
    root = _copy_root(Path(toy_mbeir_dir), tmp / "root", TASKS, link_images=True, union=True)
    reranker = Reranker.load(tiny_model_dir).merge_and_save(tmp / "reranker")
    return {"root": root, "tmp": tmp, "reranker": reranker, "base": Path(tiny_model_dir)}


def _cfg(setup, out: str, **kw) -> EvalConfig:
    pool = PairPoolConfig(actor_num_cpus=0.5, decode_num_cpus=0.25, use_gpu="false", pairs_per_batch=64)
    return _ray_cfg(
        setup["root"], setup["base"], setup["tmp"] / out, tasks=TASKS, rerank_top_k=K, rerank_pool=pool, **kw
    )


def _direct_scores(cfg: EvalConfig, model: Path, overrides, task: str, qid: str, dids: list[str], pool_file: Path):
    """P of `Reranker.score` on (query, candidate) items built as the pipeline builds them."""
    from umarvel_ray.model.reranker import Reranker, saved_reranker_config

    rr_cfg = saved_reranker_config(model, None, overrides)
    px = (rr_cfg.inputs.min_pixels, rr_cfg.inputs.max_pixels)
    root = Path(cfg.data_root)
    e = cfg.embed
    args = (str(root), str(root / e.instructions), e.prompt_index, e.instruction_seed, *px, e.text_rule)
    qf = root / TASKS_BY_NAME[task].query_file
    q_off = scan_offsets(qf, {qid}, id_key="qid")[qid]
    c_off = scan_offsets(pool_file, set(dids))
    with open(qf, "rb") as fq, open(pool_file, "rb") as fp:
        q_item = parse_row(read_at(fq, *q_off), "query", *args)[1]
        pairs = [(q_item, parse_row(read_at(fp, *c_off[d]), "candidate", *args)[1]) for d in dids]
    rr = Reranker.load(model, cfg_overrides=overrides)
    return np.asarray(rr.score(pairs, batch_size=1), dtype=np.float64)


@pytest.mark.ray
def test_umarvel_plus_reranks_as_cos_plus_w_p_yes(setup):
    cfg = _cfg(setup, "umarvel", rerank="umarvel+", rerank_model=str(setup["reranker"]), rerank_weight=W)
    rep = run_evaluation(cfg)
    out = Path(cfg.out_dir)
    md = (out / "mbeir.md").read_text()
    assert "umarvel+" in md and f"top-{K}" in md and f"w = {W}" in md
    assert "First stage" in (out / "retrieval.md").read_text()
    # The first stage is kept: same numbers as its own run files give.
    changed = 0
    for task in TASKS:
        t = TASKS_BY_NAME[task]
        qrels = read_qrels(setup["root"] / t.qrels_file)
        for pool in ("local", "global"):
            first = read_trec_run(run_path(out, task, pool))
            again = evaluate_run(first, qrels, t.k, queries=first.keys(), extra_ks=cfg.k)
            assert rep["retrieval_results"][task][pool].hit == pytest.approx(again.hit, abs=1e-12)
            reranked = read_trec_run(run_path(out / "rerank", task, pool))
            assert set(reranked) == set(first)
            r_metrics = evaluate_run(reranked, qrels, t.k, queries=reranked.keys(), extra_ks=cfg.k)
            assert rep["results"][task][pool].hit == pytest.approx(r_metrics.hit, abs=1e-12)
            for qid in sorted(first)[:2] if pool == "local" else []:
                dids = [d for d, _ in first[qid]]
                cos = [c for _, c in first[qid]]
                p = _direct_scores(cfg, setup["reranker"], None, task, qid, dids, setup["root"] / t.pool_file)
                want = [dids[i] for i in rank_fused(dids, cos, list(p), W)]
                assert [d for d, _ in reranked[qid]] == want, (task, qid)
                by_id = dict(reranked[qid])
                for d, c, pi in zip(dids, cos, p, strict=True):
                    assert by_id[d] == pytest.approx(c + W * pi, abs=W * 1e-4)  # P within 1e-4
                changed += want != dids
    assert changed >= 1  # the re-ranker did reorder something
    pairs = rep["rerank"]["pairs"]
    assert pairs["pairs_in"] == pairs["scored"] + pairs["rejected"] and pairs["rejected"] == 0
    assert pairs["pairs_in"] >= len(TASKS) * K  # every head pair, each distinct pair once
    assert "SUMMARY eval rerank (umarvel+)" in rep["rerank"]["summary"]
    assert "retrieval_local_avg=" in rep["summary"] and "rerank=umarvel+" in rep["summary"]
    for pool in ("local", "global"):
        assert rep["retrieval_averages"][pool]["n_tasks"] == len(TASKS)
        assert rep["averages"][pool]["value"] == pytest.approx(
            np.mean([rep["results"][t][pool].hit for t in TASKS]), abs=1e-12
        )
    saved = json.loads((out / "mbeir.json").read_text())
    assert saved["settings"]["rerank"]["mode"] == "umarvel+" and saved["settings"]["rerank"]["weight"] == W


@pytest.mark.ray
def test_zeroshot_uses_true_false_prompt_on_the_base_model(setup):
    cfg = _cfg(setup, "zeroshot", rerank="zeroshot", rerank_model=str(setup["base"]))
    rep = run_evaluation(cfg)
    out = Path(cfg.out_dir)
    assert "zeroshot" in (out / "mbeir.md").read_text()
    task, t = "webqa_task1", TASKS_BY_NAME["webqa_task1"]
    first = read_trec_run(run_path(out, task, "local"))
    reranked = read_trec_run(run_path(out / "rerank", task, "local"))
    qid = sorted(first)[0]
    dids = [d for d, _ in first[qid]]
    pool_file = setup["root"] / t.pool_file
    p_true = _direct_scores(cfg, setup["base"], {"judge": "true_false"}, task, qid, dids, pool_file)
    p_yes = _direct_scores(cfg, setup["base"], None, task, qid, dids, pool_file)
    got = dict(reranked[qid])
    assert np.allclose([got[d] for d in dids], p_true, atol=1e-5)  # the score is P(True) ...
    assert not np.allclose(p_true, p_yes, atol=1e-4)  # ... not the Yes/No judge's P(Yes)
    assert [s for _, s in reranked[qid]] == sorted((s for _, s in reranked[qid]), reverse=True)
    assert rep["rerank"]["mode"] == "zeroshot" and rep["rerank"]["weight"] is None
