"""The re-ranker as a judge: the two-word loss, the held-out split and its pairwise accuracy, and a
2-worker Ray run that learns to put P(Yes | positive) above P(Yes | negative)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from umarvel_ray.config import resolve_paths
from umarvel_ray.data.holdout import is_heldout
from umarvel_ray.layout import TRAIN_SUMMARY_FILE
from umarvel_ray.model.reranker import Reranker, RerankerConfig
from umarvel_ray.train.reranker import RerankerTrainConfig, RerankPairs
from umarvel_ray.train.reranker_heldout import heldout_groups, heldout_metrics, summary_fields

TRAIN = "query/train/mbeir_union_up_train.jsonl"
POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_negatives(data: Path, out: Path, n: int = 2) -> dict[str, list[str]]:
    """Hand-'mined' negatives for every train query: n pool dids after a query-dependent offset."""
    pool = [r["did"] for r in _rows(data / POOL)]
    negs: dict[str, list[str]] = {}
    for i, q in enumerate(_rows(data / TRAIN)):
        pos = set(q["pos_cand_list"])
        start = (i * 7) % len(pool)
        negs[q["qid"]] = [d for d in pool[start:] + pool[:start] if d not in pos][:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"qid": k, "neg_dids": v}) + "\n" for k, v in negs.items()))
    return negs


def _cfg(tmp_path: Path, data: Path, model: str = "unused", **kw) -> RerankerTrainConfig:
    base = dict(
        model=model,
        run_dir=str(tmp_path / "run"),
        data_root=str(data),
        negatives_file="{run_dir}/negatives/negatives.jsonl",
    )
    base.update(kw)
    return resolve_paths(RerankerTrainConfig(**base))


# ---------------------------------------------------------------------------------------------
# The loss over the two answer words
# ---------------------------------------------------------------------------------------------


def test_two_word_loss_exact_numbers():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 3.0]])
    positive = torch.tensor([True, False, True, True])
    # -log softmax of the right word: log(1+e^-2), log(1+e^-1), log 2, log(1+e^2.5)
    want = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2.5))) / 4
    assert Reranker.two_word_loss(logits, positive).item() == pytest.approx(want, abs=1e-6)


def test_reranker_loss_is_the_two_word_cross_entropy(tiny_model_dir):
    rr = Reranker.build(RerankerConfig(model=str(tiny_model_dir)))
    pairs = [
        ({"text": "a red dress", "instruction": "Find it."}, {"text": "red dress"}),
        ({"text": "a blue car", "instruction": "Find it."}, {"text": "green tree"}),
        ({"text": "two dogs", "instruction": "Find it."}, {"text": "two dogs on grass"}),
    ]
    labels = [True, False, True]
    batch = rr.collate(pairs, labels)
    with torch.no_grad():
        got = rr.loss(batch).item()
        two = rr(batch)  # (B, 2) [Yes, No]
        full = rr.answer_logits(batch)
    p_right = torch.softmax(two, -1)[torch.arange(3), torch.tensor([0, 1, 0])]
    assert got == pytest.approx(float(-p_right.log().mean()), abs=1e-5)
    # not the full-vocabulary cross-entropy of the answer token (the old loss)
    target = torch.tensor([rr.collator.answer_ids[0 if y else 1] for y in labels])
    assert abs(got - torch.nn.functional.cross_entropy(full, target).item()) > 0.5


# ---------------------------------------------------------------------------------------------
# Held-out split and accuracy
# ---------------------------------------------------------------------------------------------


def test_heldout_metrics_exact_arithmetic():
    m = heldout_metrics([0.9, 0.2, 0.6], [[0.1, 0.95, 0.9], [0.1], [0.5, 0.7]])
    # wins: 0.9>0.1, 0.9>0.95 no, 0.9>0.9 tie = no, 0.2>0.1, 0.6>0.5, 0.6>0.7 no -> 3 of 6
    assert m == {
        "queries": 3,
        "pairs": 6,
        "pairwise_accuracy": 0.5,
        "mean_p_yes_pos": pytest.approx(1.7 / 3),
        "mean_p_yes_neg": pytest.approx((0.1 + 0.95 + 0.9 + 0.1 + 0.5 + 0.7) / 6),
    }
    assert heldout_metrics([0.5], [[0.5]])["pairwise_accuracy"] == 0.0  # a constant judge scores 0
    assert heldout_metrics([], [])["pairwise_accuracy"] is None
    with pytest.raises(ValueError, match="2 positive scores but 1 negative lists"):
        heldout_metrics([0.1, 0.2], [[0.3]])


def test_summary_fields_read_the_heldout_result(tmp_path):
    f = tmp_path / TRAIN_SUMMARY_FILE
    assert summary_fields(f) == {}
    held = {"queries": 3, "pairs": 6, "pairwise_accuracy": 0.5, "mean_p_yes_pos": 0.56667, "mean_p_yes_neg": 0.5}
    f.write_text(json.dumps({"stage": "reranker", "heldout": held}))
    assert summary_fields(f) == {
        "heldout_pairwise_accuracy": "0.5000",
        "heldout_mean_p_yes_pos": "0.5667",
        "heldout_mean_p_yes_neg": "0.5000",
        "heldout_queries": 3,
        "heldout_pairs": 6,
    }


def test_training_leaves_heldout_queries_out_and_heldout_groups_hold_them(tmp_path, toy_mbeir_dir):
    cfg = _cfg(tmp_path, toy_mbeir_dir, holdout_fraction=0.25, negatives_per_positive=1, heldout_max_queries=5)
    negs = _write_negatives(toy_mbeir_dir, cfg.negatives_path(), n=2)
    queries = {q["qid"]: q for q in _rows(toy_mbeir_dir / TRAIN)}
    train = RerankPairs(cfg)
    train_qids = {q["qid"] for q in train.queries.queries}
    assert train_qids and not any(is_heldout(q, 0.25) for q in train_qids)
    held_all = [q for q in queries if is_heldout(q, 0.25)]
    assert len(train_qids) + len(held_all) == len({q for q in queries if negs[q]})

    groups = heldout_groups(cfg)
    assert len(groups) == 5
    pool = {r["did"]: r for r in _rows(toy_mbeir_dir / POOL)}
    from umarvel_ray.data.model_items import candidate_item

    for (q, p, ns), qid in zip(groups, held_all[:5], strict=True):
        assert qid not in train_qids
        assert any(candidate_item(pool[d]) == p for d in queries[qid]["pos_cand_list"])
        assert ns == [candidate_item(pool[d]) for d in negs[qid]]  # every mined negative, in order
        assert q["instruction"] and (q["text"] or q["image"])
    # heldout_negatives=1: only each query's first (hardest) mined negative
    first = heldout_groups(_cfg(tmp_path, toy_mbeir_dir, holdout_fraction=0.25, heldout_max_queries=5,
                                heldout_negatives=1))
    assert [ns for _, _, ns in first] == [[candidate_item(pool[negs[q][0]])] for q in held_all[:5]]


# ---------------------------------------------------------------------------------------------
# Through the real loop: 2 gloo workers under Ray Train + DeepSpeed
# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_trained_judge_ranks_positives_above_negatives(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    from umarvel_ray.data.images import load_image
    from umarvel_ray.train.launch import run_reranker_training

    cfg = _cfg(
        tmp_path,
        toy_mbeir_dir,
        model=str(tiny_model_dir),
        lora_r=8,
        lora_alpha=16,
        lr=3e-3,
        warmup_ratio=0.0,
        per_device_batch=4,
        negatives_per_positive=1,
        max_examples=4,  # 4 queries x (1 Yes + 1 No) = 8 pairs = one global batch, learned by heart
        max_steps=25,
        log_every=5,
        save_every=25,
        workers=2,
        cpus_per_worker=0.5,
        max_failures=0,
        zero_stage=1,
        holdout_fraction=0.2,
        heldout_max_queries=3,
    )
    _write_negatives(toy_mbeir_dir, cfg.negatives_path(), n=1)
    out = run_reranker_training(cfg)

    def dec(item: dict) -> dict:
        return {**item, "image": load_image(toy_mbeir_dir, item["image"]) if item["image"] else None}

    pairs = RerankPairs(cfg)
    items = [pairs.pair(i, 0) for i in range(len(pairs))]
    judge = Reranker.load(out)
    p = judge.score([(dec(q), dec(c)) for q, c, _ in items])
    assert [y for _, _, y in items] == [True, False] * 4
    assert np.all(p[0::2] > p[1::2]), p  # every training query: P(Yes | pos) > P(Yes | neg)

    # held-out: computed after the merge, written to the summary, equal to the saved judge's scores
    held = json.loads((cfg.stage_dir / TRAIN_SUMMARY_FILE).read_text())["heldout"]
    groups = heldout_groups(cfg)
    assert held["queries"] == len(groups) == 3 and held["pairs"] == 3 and held["skipped"] == 0
    scores = [judge.score([(dec(q), dec(c)) for c in [pos, *ns]]) for q, pos, ns in groups]
    again = heldout_metrics([s[0] for s in scores], [s[1:].tolist() for s in scores])
    assert held["pairwise_accuracy"] == again["pairwise_accuracy"]
    assert held["mean_p_yes_pos"] == pytest.approx(again["mean_p_yes_pos"], abs=1e-4)
    assert held["mean_p_yes_neg"] == pytest.approx(again["mean_p_yes_neg"], abs=1e-4)
