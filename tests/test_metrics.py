"""Metrics on hand-made runs whose values are computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from umarvel_ray.eval.metrics import (
    RetrievalMetrics,
    evaluate_run,
    hit_rate_at_k,
    mrr_at_k,
    per_query,
    recall_at_k,
    run_from_search,
)

QRELS = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}, "q4": {"d"}, "q5": {"a"}}
RUN = {
    "q1": [("x", 0.9), ("a", 0.8), ("y", 0.1)],  # first positive at rank 2
    "q2": [("b", 0.9), ("x", 0.5), ("c", 0.4)],  # 2 positives: one in top 2, one at rank 3
    "q3": [("x", 0.9), ("y", 0.2)],  # positive "z" is not in the pool
    "q4": [("x", 0.9), ("y", 0.8), ("d", 0.7)],  # first positive at rank 3
    "qn": [("a", 0.9)],  # no qrels: excluded
    # q5 has qrels but no run (e.g. its image failed to decode): a counted miss
}
POOL = {"a", "b", "c", "d", "x", "y"}


def test_hand_computed_values_at_k2():
    m = evaluate_run(RUN, QRELS, k=2, pool_ids=POOL)
    assert m.n_queries == 5 and m.n_no_qrels == 1 and m.n_missing_from_run == 1 and m.n_unreachable == 1
    assert m.hit == pytest.approx((1 + 1 + 0 + 0 + 0) / 5)
    assert m.recall == pytest.approx((1 + 0.5 + 0 + 0 + 0) / 5)  # true recall < hit rate (q2)
    assert m.mrr_at_k == pytest.approx((1 / 2 + 1 + 0 + 0 + 0) / 5)
    assert m.mrr == pytest.approx((1 / 2 + 1 + 0 + 1 / 3 + 0) / 5)  # q4 counts beyond k
    assert m.hits_at == pytest.approx({1: 1 / 5, 2: 2 / 5, 5: 3 / 5, 10: 3 / 5})


def test_several_positives_hit_vs_recall():
    qrels = {"q": {"a", "b", "c", "d"}}
    run = {"q": [("a", 0.9), ("x", 0.8), ("b", 0.7), ("c", 0.1)]}
    assert hit_rate_at_k(run, qrels, 1) == 1.0
    assert recall_at_k(run, qrels, 1) == pytest.approx(1 / 4)
    assert recall_at_k(run, qrels, 3) == pytest.approx(2 / 4)
    assert recall_at_k(run, qrels, 10) == pytest.approx(3 / 4)  # "d" never retrieved
    # A duplicated id must not count twice.
    assert recall_at_k({"q": [("a", 0.9), ("a", 0.9)]}, qrels, 2) == pytest.approx(1 / 4)


def test_ties_follow_the_given_rank_order():
    qrels = {"q": {"a"}}
    assert hit_rate_at_k({"q": [("x", 0.5), ("a", 0.5)]}, qrels, 1) == 0.0
    assert hit_rate_at_k({"q": [("a", 0.5), ("x", 0.5)]}, qrels, 1) == 1.0
    assert mrr_at_k({"q": [("x", 0.5), ("a", 0.5)]}, qrels, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not sorted"):
        hit_rate_at_k({"q": [("x", 0.1), ("a", 0.5)]}, qrels, 1)


def test_convenience_functions_use_only_run_queries_with_qrels():
    # q1..q4 are evaluated (q5 is not in the run, qn has no qrels): hits q1, q2.
    assert hit_rate_at_k(RUN, QRELS, 2) == pytest.approx(2 / 4)
    assert mrr_at_k(RUN, QRELS, 2) == pytest.approx((1 / 2 + 1) / 4)


def test_per_query_and_unreachable_flag():
    scores, counts = per_query(RUN, QRELS, k=2, pool_ids=POOL, queries=["q1", "q3", "qn"])
    assert set(scores) == {"q1", "q3"} and counts == {
        "n_no_qrels": 1,
        "n_missing_from_run": 0,
        "n_unreachable": 1,
    }
    assert scores["q1"].first_rank == 2 and scores["q1"].reachable
    assert not scores["q3"].reachable and scores["q3"].hit == 0.0 and scores["q3"].first_rank is None


def test_run_from_search_drops_padding_and_round_trips_dict():
    scores = np.array([[0.75, 0.5, -np.inf], [0.5, 0.25, 0.125]], np.float32)  # exact in float32
    ids = [["a", "b", ""], ["c", "a", "b"]]
    run = run_from_search(["q1", "q2"], scores, ids)
    assert run == {"q1": [("a", 0.75), ("b", 0.5)], "q2": [("c", 0.5), ("a", 0.25), ("b", 0.125)]}
    with pytest.raises(ValueError, match="duplicate"):
        run_from_search(["q", "q"], scores, ids)
    m = evaluate_run(RUN, QRELS, k=2)
    assert RetrievalMetrics.from_dict(m.to_dict()) == m
