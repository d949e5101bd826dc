"""Hard-negative mining: the selection rule on hand-made lists, then the full Ray path on the toy set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from umarvel_ray.data import catalogue, mbeir
from umarvel_ray.data.artefacts import read_negatives
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.mine.run import run_mining
from umarvel_ray.mine.select import pad_repeat, select_negatives

# ---------------------------------------------------------------------------------------------
# select_negatives (pure)
# ---------------------------------------------------------------------------------------------


def test_umarvel_skips_positives_and_keeps_rank_order():
    ids = ["a", "p1", "b", "c", "p2", "d", "e", "f"]
    scores = [0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4]
    sel = select_negatives(ids, scores, {"p1", "p2"}, num=5)
    assert sel.neg_dids == ["a", "b", "c", "d", "e"]
    assert sel.n_candidates == 6
    assert sel.n_positives_skipped == 2


def test_umarvel_pads_by_repeating_in_order():
    sel = select_negatives(["p", "a", "b", ""], [0.9, 0.5, 0.4, float("-inf")], {"p"}, num=5)
    assert sel.neg_dids == ["a", "b", "a", "b", "a"]
    assert sel.n_candidates == 2
    assert pad_repeat(["x"], 3) == ["x", "x", "x"]
    assert pad_repeat([], 3) == []


def test_max_score_filter_drops_only_scores_above_threshold():
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    scores = [0.95, 0.71, 0.7, 0.69, 0.5, 0.4, 0.3]
    sel = select_negatives(ids, scores, set(), num=5, max_score=0.7)
    assert sel.neg_dids == ["c", "d", "e", "f", "g"]
    assert sel.n_filtered == 2
    unfiltered = select_negatives(ids, scores, set(), num=5)
    assert unfiltered.neg_dids == ["a", "b", "c", "d", "e"] and unfiltered.n_filtered == 0


def test_margin_drops_candidates_within_margin_of_the_best_positive():
    # best positive p1 scores 0.80: threshold 0.80 - 0.05 = 0.75; a, b (above) and c (0.76) are dropped,
    # d (exactly 0.75) is kept (strictly above drops); p2 (a weaker positive) is not the anchor
    ids = ["a", "b", "p1", "c", "d", "p2", "e", "f", "g"]
    scores = [0.95, 0.9, 0.8, 0.76, 0.75, 0.7, 0.6, 0.5, 0.4]
    sel = select_negatives(ids, scores, {"p1", "p2"}, num=3, margin=0.05)
    assert sel.neg_dids == ["d", "e", "f"]
    assert (sel.n_margin, sel.n_filtered, sel.n_candidates, sel.n_positives_skipped) == (3, 0, 4, 2)
    # margin 0: only candidates scoring above the positive itself go
    sel0 = select_negatives(ids, scores, {"p1", "p2"}, num=3, margin=0.0)
    assert sel0.neg_dids == ["c", "d", "e"] and sel0.n_margin == 2
    # off: the plain first-N walk
    off = select_negatives(ids, scores, {"p1", "p2"}, num=3)
    assert off.neg_dids == ["a", "b", "c"] and off.n_margin == 0
    # with max_score too: a drops by max_score (counted there only), b and c by the margin
    both = select_negatives(ids, scores, {"p1", "p2"}, num=3, margin=0.05, max_score=0.92)
    assert both.neg_dids == ["d", "e", "f"] and (both.n_filtered, both.n_margin) == (1, 2)


def test_margin_without_a_retrieved_positive_drops_all_and_pads_what_is_left():
    ids, scores = ["a", "b", "c"], [0.9, 0.8, 0.7]
    sel = select_negatives(ids, scores, {"elsewhere"}, num=3, margin=0.05)
    assert sel.neg_dids == [] and sel.n_margin == 3 and sel.n_candidates == 0
    # one candidate left under the threshold: padded by repeating
    sel = select_negatives(["a", "p", "b"], [0.9, 0.85, 0.5], {"p"}, num=3, margin=0.1)
    assert sel.neg_dids == ["b", "b", "b"] and sel.n_candidates == 1 and sel.n_margin == 1
    with pytest.raises(ValueError, match="margin"):
        select_negatives(ids, scores, {"a"}, margin=-0.1)


def test_margin_applies_before_mmembed_sampling():
    ids, scores, modality, positives = _mm_list(60, pos_rank=9)  # scores 1.0 - i/100, pos at 0.91
    # threshold 0.91 - 0.055 = 0.855: ranks 0..14 score above it: 14 candidates (the positive aside) drop
    sel = select_negatives(
        ids,
        scores,
        positives,
        num=5,
        strategy="mmembed",
        cand_modality=modality,
        query_target_modality="image",
        rng=random.Random(0),
        margin=0.055,
    )
    # C1 (wrong modality above the positive) is empty: all of c0..c8 score above the threshold
    assert sel.n_c1 == 0 and sel.n_c2 == 3 and sel.n_margin == 14
    assert sorted(set(sel.neg_dids)) == ["c45", "c47", "c49"]


def test_all_positives_gives_no_negatives():
    sel = select_negatives(["p1", "p2", ""], [0.9, 0.8, float("-inf")], {"p1", "p2"}, num=5)
    assert sel.neg_dids == [] and sel.n_candidates == 0 and sel.n_positives_skipped == 2
    # the max_score filter can also empty the list
    sel = select_negatives(["a", "b"], [0.9, 0.8], set(), num=5, max_score=0.7)
    assert sel.neg_dids == [] and sel.n_filtered == 2


def test_tally_counts_what_each_filter_dropped():
    from umarvel_ray.data.queries import QueryMeta
    from umarvel_ray.mine.run import _Tally
    from umarvel_ray.mine.select import Selection

    tally = _Tally()
    meta = QueryMeta(qid="2:1", task_id=1, dataset_id=2, positives=frozenset({"p"}))
    assert meta.task == "webqa_task1"
    tally.add("1:1", meta, Selection(["a", "b", "c"], 3, 1, n_filtered=2, n_margin=0), 3)
    tally.add("1:2", meta, Selection(["a", "a", "a"], 1, 1, n_filtered=0, n_margin=4), 3)
    tally.add("1:3", meta, Selection([], 0, 0, n_filtered=1, n_margin=5), 3)
    t = tally.totals
    assert (t["filtered_max_score"], t["queries_filtered_max_score"]) == (3, 2)
    assert (t["filtered_margin"], t["queries_filtered_margin"]) == (9, 2)
    assert tally.per_task["webqa_task1"] == dict(queries=3, full=1, padded=1, no_negatives=1)
    assert tally.empty == [
        {"qid": "1:3", "task": "webqa_task1", "positives_in_topk": 0, "filtered_max_score": 1, "filtered_margin": 5}
    ]


def _mm_list(
    n: int = 60, pos_rank: int | None = 9
) -> tuple[list[str], list[float], dict[str, str], set[str]]:
    """n ranked ids, alternating text/image modality, one positive (image) at 0-based `pos_rank`."""
    ids = [f"c{i}" for i in range(n)]
    scores = [1.0 - i / 100 for i in range(n)]
    modality = {d: ("text" if i % 2 == 0 else "image") for i, d in enumerate(ids)}
    positives: set[str] = set()
    if pos_rank is not None:
        ids[pos_rank] = "pos"
        modality["pos"] = "image"
        positives = {"pos"}
    return ids, scores, modality, positives


def test_mmembed_samples_only_from_c1_and_c2():
    ids, scores, modality, positives = _mm_list(60, pos_rank=9)
    c1 = {ids[r] for r in range(9) if modality[ids[r]] == "text"}  # wrong modality above the positive
    c2 = {ids[r] for r in range(45, 50) if modality[ids[r]] == "image"}  # right modality, ranks 46-50
    assert c1 == {"c0", "c2", "c4", "c6", "c8"} and c2 == {"c45", "c47", "c49"}
    seen: set[str] = set()
    for seed in range(20):
        sel = select_negatives(
            ids,
            scores,
            positives,
            num=5,
            strategy="mmembed",
            cand_modality=modality,
            query_target_modality="image",
            rng=random.Random(seed),
        )
        assert len(sel.neg_dids) == 5 == len(set(sel.neg_dids))
        assert set(sel.neg_dids) <= c1 | c2
        assert sel.neg_dids == sorted(sel.neg_dids, key=ids.index)  # returned in rank order
        assert (sel.n_c1, sel.n_c2, sel.n_candidates) == (5, 3, 8)
        seen |= set(sel.neg_dids)
    assert seen == c1 | c2  # the rng really samples across the union
    # right-modality candidates ranked above the positive are never negatives, nor the positive
    assert not seen & {"c1", "c3", "c5", "c7", "pos"}
    a = select_negatives(ids, scores, positives, 5, "mmembed", None, modality, "image", random.Random(3))
    b = select_negatives(ids, scores, positives, 5, "mmembed", None, modality.get, "image", random.Random(3))
    assert a.neg_dids == b.neg_dids  # fixed rng: deterministic; mapping and callable agree


def test_mmembed_without_retrieved_positive_and_padding():
    ids, scores, modality, _ = _mm_list(12, pos_rank=None)
    # no positive retrieved: every wrong-modality candidate counts as ranked above it; list too short for C2
    sel = select_negatives(
        ids,
        scores,
        {"elsewhere"},
        num=8,
        strategy="mmembed",
        cand_modality=modality,
        query_target_modality="image",
        rng=random.Random(0),
    )
    text = [d for d in ids if modality[d] == "text"]
    assert sel.n_c1 == 6 and sel.n_c2 == 0
    assert sel.neg_dids == pad_repeat(text, 8)
    # a positive inside the C2 window is still excluded; positive at rank 0 leaves C1 empty
    ids, scores, modality, positives = _mm_list(60, pos_rank=0)
    ids[47] = "pos2"
    modality["pos2"] = "image"
    sel = select_negatives(
        ids,
        scores,
        positives | {"pos2"},
        num=5,
        strategy="mmembed",
        cand_modality=modality,
        query_target_modality="image",
        rng=random.Random(0),
    )
    assert sel.n_c1 == 0 and sorted(set(sel.neg_dids)) == ["c45", "c49"]


def test_mmembed_needs_rng_and_modalities():
    ids, scores, modality, positives = _mm_list(60)
    with pytest.raises(ValueError, match="rng"):
        select_negatives(
            ids, scores, positives, strategy="mmembed", cand_modality=modality, query_target_modality="image"
        )
    with pytest.raises(ValueError, match="cand_modality"):
        select_negatives(
            ids, scores, positives, strategy="mmembed", query_target_modality="image", rng=random.Random(0)
        )
    with pytest.raises(KeyError, match="no modality"):
        select_negatives(
            ids,
            scores,
            positives,
            strategy="mmembed",
            cand_modality={},
            query_target_modality="image",
            rng=random.Random(0),
        )
    with pytest.raises(ValueError, match="strategy"):
        select_negatives(ids, scores, positives, strategy="nope")


# ---------------------------------------------------------------------------------------------
# Full path on the toy benchmark (Ray Data embedding + index + selection)
# ---------------------------------------------------------------------------------------------

# Same embedding settings and shared files as tests/test_teacher.py, so the pool is embedded once.
EMBED = {"actor_num_cpus": 0.5, "decode_num_cpus": 0.25, "batch_size": 16, "chunk_rows": 64}


def make_shared_inputs(toy: Path, base: Path) -> tuple[Path, Path]:
    """A 48-query training subset (3 per task) and a ~130-candidate mixed-modality train pool.

    The pool holds the positives of those queries plus the first 5 candidates of every
    (dataset, modality) group of the union train pool. Deterministic; written once per session.
    """
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


def _records(path: Path) -> dict[str, dict]:
    return {json.loads(x)["qid"]: json.loads(x) for x in path.read_text().splitlines() if x.strip()}


def _pool_records(path: Path) -> dict[str, dict]:
    return {json.loads(x)["did"]: json.loads(x) for x in path.read_text().splitlines() if x.strip()}


@pytest.mark.ray
@pytest.mark.slow
def test_mining_end_to_end(ray_cluster, tiny_model_dir, toy_mbeir_dir, shared, tmp_path):
    from umarvel_ray.store import read_embeddings

    toy = Path(toy_mbeir_dir)
    queries = {q["qid"]: q for q in map(json.loads, shared["queries"].read_text().splitlines())}
    train_qids = {json.loads(x)["qid"] for x in (toy / mbeir.TRAIN_QUERY_FILE).read_text().splitlines()}
    pool = _pool_records(shared["pool"])
    first40 = list(queries)[:40]

    def cfg(out: Path, **kw) -> MineConfig:
        return MineConfig(
            data_root=str(toy),
            model=str(tiny_model_dir),
            output_dir=str(out),
            query_file=str(shared["queries"]),
            pool_file=str(shared["pool"]),
            pool_embeddings=str(shared["pool_emb"]),
            query_embeddings=str(tmp_path / "q_emb"),
            max_queries=40,
            embed=EmbedConfig(**EMBED),
            **kw,
        )

    res = run_mining(cfg(tmp_path / "run1"))
    recs = _records(res.negatives_path)
    c = res.counts
    assert c["queries_read"] == 40 and c["queries_invalid"] == 0 and c["queries_not_embedded"] == 0
    assert c["queries_written"] + c["no_negatives"] == c["queries_mined"] == 40
    assert c["full"] + c["padded"] == c["queries_written"]
    assert set(recs) <= set(first40) <= train_qids
    assert list(recs) == sorted(recs, key=lambda q: mbeir.split_id(q))
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["counts"]["no_negatives"] == len(
        (tmp_path / "run1" / "no_negatives.jsonl").read_text().splitlines()
    )

    # Negatives are the best-scoring non-positives (checked against a numpy dot product).
    q_emb = read_embeddings(tmp_path / "q_emb")
    p_emb = read_embeddings(shared["pool_emb"])
    sims = q_emb.vectors @ p_emb.vectors.T
    qrow = {q: i for i, q in enumerate(q_emb.ids.tolist())}
    pids = p_emb.ids.tolist()
    for qid, rec in recs.items():
        pos = set(queries[qid]["pos_cand_list"])
        negs = rec["neg_dids"]
        assert len(negs) == 5
        assert not set(negs) & pos
        assert set(negs) <= set(pool)
        s = dict(zip(pids, sims[qrow[qid]].tolist(), strict=True))
        others = [s[d] for d in pids if d not in pos and d not in negs]
        if rec["n_candidates"] >= 5:
            assert len(set(negs)) == 5
            assert min(s[d] for d in negs) >= max(others, default=-1) - 1e-5
    assert c["padded"] == 0  # the pool is larger than depth can exhaust

    # Second run: same embeddings (verified and reused, not rewritten), byte-identical output.
    part = next((tmp_path / "q_emb").glob("part-*.parquet"))
    mtime = part.stat().st_mtime_ns
    res2 = run_mining(cfg(tmp_path / "run2"))
    assert res2.negatives_path.read_bytes() == res.negatives_path.read_bytes()
    assert part.stat().st_mtime_ns == mtime

    # MM-Embed variant over the same embeddings: C1 = wrong modality scoring at least the best
    # positive, C2 = right modality around ranks 46-50 (tolerance for float near-ties).
    res3 = run_mining(cfg(tmp_path / "run3", strategy="mmembed", depth=50, seed=1))
    mm = _records(res3.negatives_path)
    assert set(mm) <= set(first40)
    mod = dict(zip(pids, p_emb.modalities.tolist(), strict=True))
    for qid, rec in mm.items():
        q = queries[qid]
        target = catalogue.task_modalities(q["task_id"])[1]
        pos = set(q["pos_cand_list"])
        assert len(rec["neg_dids"]) == 5 and not set(rec["neg_dids"]) & pos
        row = sims[qrow[qid]]
        s = dict(zip(pids, row.tolist(), strict=True))
        best_pos = max((s[d] for d in pos if d in s), default=-np.inf)
        for d in set(rec["neg_dids"]):
            if mod[d] != target:
                assert s[d] >= best_pos - 1e-5
            else:
                above = int((row > s[d] + 1e-5).sum())
                at_least = int((row > s[d] - 1e-5).sum())
                assert above <= 49 and at_least >= 45
    assert res3.counts["c1"] + res3.counts["c2"] > 0
    assert read_negatives(tmp_path / "run3") == {q: r["neg_dids"] for q, r in mm.items()}


def _job_main(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_config_errors(toy_mbeir_dir, tmp_path):
    from umarvel_ray.config import ConfigError
    from umarvel_ray.mine.config import validate_config

    ok = {"data_root": str(toy_mbeir_dir), "output_dir": str(tmp_path)}
    validate_config(MineConfig(**ok))
    with pytest.raises(ConfigError, match="depth >= 50"):
        validate_config(MineConfig(**ok, strategy="mmembed", depth=40))
    with pytest.raises(ConfigError, match="strategy"):
        validate_config(MineConfig(**ok, strategy="random"))
    with pytest.raises(ConfigError, match="margin must be >= 0"):
        validate_config(MineConfig(**ok, margin=-0.05))
    with pytest.raises(ConfigError, match="input file not found"):
        validate_config(MineConfig(**ok, query_file="nope.jsonl"))
    with pytest.raises(ConfigError, match="data_root"):
        validate_config(MineConfig(data_root=str(tmp_path / "missing"), output_dir=str(tmp_path)))
    main = _job_main("mine_negatives")
    assert main([f"data_root={tmp_path / 'missing'}", f"output_dir={tmp_path}"]) == 2
    assert main([f"data_root={toy_mbeir_dir}", f"output_dir={tmp_path}", "strategy=mmembed", "depth=10"]) == 2
