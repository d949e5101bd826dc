"""Held-out train queries: a fixed, qid-determined slice that training leaves out."""

from __future__ import annotations

import pytest

from umarvel_ray.data.holdout import holdout_key, is_heldout, split_queries
from umarvel_ray.train.data import MBEIRTrain


def test_split_is_a_partition_of_about_the_fraction() -> None:
    rows = [{"qid": f"9:{i}"} for i in range(4000)]
    train = split_queries(rows, 0.1, "train")
    held = split_queries(rows, 0.1, "heldout")
    assert {r["qid"] for r in train}.isdisjoint(r["qid"] for r in held)
    assert len(train) + len(held) == 4000
    assert 340 <= len(held) <= 460  # binomial(4000, 0.1): mean 400, sd 19
    assert split_queries(rows, 0.1, "all") == rows
    assert split_queries(rows, 0.0, "heldout") == [] and split_queries(rows, 0.0, "train") == rows


def test_key_depends_on_the_qid_only() -> None:
    assert holdout_key("3:17") == holdout_key("3:17") != holdout_key("3:18")
    assert 0.0 <= holdout_key("3:17") < 1.0
    # a bigger slice contains the smaller one: raising the fraction only adds queries
    small = {f"1:{i}" for i in range(500) if is_heldout(f"1:{i}", 0.05)}
    big = {f"1:{i}" for i in range(500) if is_heldout(f"1:{i}", 0.2)}
    assert small < big


def test_bad_split_or_fraction() -> None:
    with pytest.raises(ValueError, match="split must be"):
        split_queries([], 0.1, "test")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_queries([], 1.0, "train")


def test_mbeir_train_leaves_heldout_queries_out(toy_mbeir_dir) -> None:
    args = (
        toy_mbeir_dir / "query/train/mbeir_union_up_train.jsonl",
        toy_mbeir_dir / "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        toy_mbeir_dir / "instructions/query_instructions.tsv",
    )
    every = MBEIRTrain(*args, seed=1)
    train = MBEIRTrain(*args, seed=1, holdout_fraction=0.2)
    held = MBEIRTrain(*args, seed=1, holdout_fraction=0.2, split="heldout")
    qids = [q["qid"] for q in every.queries]
    assert [q["qid"] for q in train.queries] == [q for q in qids if not is_heldout(q, 0.2)]
    assert [q["qid"] for q in held.queries] == [q for q in qids if is_heldout(q, 0.2)]
    assert held.queries and train.queries


def test_teacher_samples_only_heldout_queries() -> None:
    from umarvel_ray.data.queries import QueryMeta
    from umarvel_ray.teacher.config import TeacherConfig
    from umarvel_ray.teacher.run import _sample

    metas = {f"1:{i}": QueryMeta(f"1:{i}", 0, 1, frozenset({"x"})) for i in range(1000)}
    held = {q for q in metas if is_heldout(q, 0.2)}
    half = _sample(TeacherConfig(fraction=0.1, holdout_fraction=0.2), metas)
    every = _sample(TeacherConfig(fraction=0.3, holdout_fraction=0.2), metas)
    assert set(every["fashion200k_task0"]) == held  # a fraction above the slice takes all of it
    assert set(half["fashion200k_task0"]) < held and len(half["fashion200k_task0"]) == round(len(held) / 2)
    plain = _sample(TeacherConfig(fraction=0.1), metas)
    assert len(plain["fashion200k_task0"]) == 100 and not set(plain["fashion200k_task0"]) <= held
