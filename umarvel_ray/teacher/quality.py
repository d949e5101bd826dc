"""How good the distillation teacher is, measured before stage 5 trusts it.

The teacher ranks each sampled query's local top-K by cos + w * P(Yes); the candidates arrive in
cos order. On the queries' labelled positives this compares the two rankings: MRR@K and hit@1 of
cos alone and of the fused score, and the re-ranker's pairwise accuracy (P(Yes) of a positive
above P(Yes) of a negative of the same query). With held-out queries (`holdout_fraction` > 0, the
slice stages 3-4 and the re-ranker did not train on) the comparison is fair to both; on trained
queries cos is flattered. Stage 5's gate (train/gate.py) skips distillation unless the fused MRR
beats cos's: a teacher no better than the student can only flatten the student's ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from umarvel_ray.model.fusion import pairwise_wins


def first_positive_rank(order: Sequence[int], labels: Sequence[bool]) -> int | None:
    """1-based rank of the first positive in `order` (candidate indices, best first); None if none."""
    for rank, i in enumerate(order, 1):
        if labels[i]:
            return rank
    return None


def _ranking_stats(ranks: list[int | None], n: int) -> dict[str, float]:
    mrr = sum(1.0 / r for r in ranks if r is not None) / n if n else 0.0
    hit1 = sum(1 for r in ranks if r == 1) / n if n else 0.0
    return {"mrr": round(mrr, 6), "hit_at_1": round(hit1, 6)}


def teacher_quality(
    records: Sequence[Mapping[str, Any]], positives: Mapping[str, frozenset[str] | set[str]], held_out: bool
) -> dict[str, Any]:
    """Quality of teacher records ({qid, candidates, cos, p_yes, scores}) against labelled positives.

    Returns {"queries", "queries_with_positive", "held_out", "cos": {mrr, hit_at_1},
    "fused": {mrr, hit_at_1}, "p_yes": {"pairwise_accuracy", "pairs", "mean_positive",
    "mean_negative"} or None without a re-ranker, "fusion_beats_cos"}. MRR and hit@1 average over
    all queries (a query whose positive is outside the top-K counts 0 for both rankings); ties in
    the fused score keep cos order (a stable sort).
    """
    cos_ranks: list[int | None] = []
    fused_ranks: list[int | None] = []
    wins = pairs = 0
    pos_p: list[float] = []
    neg_p: list[float] = []
    with_pos = 0
    for r in records:
        pos = positives.get(str(r["qid"]), frozenset())
        labels = [c in pos for c in r["candidates"]]
        with_pos += any(labels)
        order = sorted(range(len(labels)), key=lambda i: -float(r["cos"][i]))
        fused = sorted(order, key=lambda i: -float(r["scores"][i]))
        cos_ranks.append(first_positive_rank(order, labels))
        fused_ranks.append(first_positive_rank(fused, labels))
        if r.get("p_yes") is not None:
            p = np.asarray([np.nan if v is None else v for v in r["p_yes"]], dtype=np.float64)
            lab = np.asarray(labels, dtype=bool)
            ok = ~np.isnan(p)
            pp, nn = p[lab & ok], p[~lab & ok]
            pos_p += pp.tolist()
            neg_p += nn.tolist()
            won, n_pairs = pairwise_wins(pp.tolist(), nn.tolist())
            wins += won
            pairs += n_pairs
    n = len(records)
    cos, fused = _ranking_stats(cos_ranks, n), _ranking_stats(fused_ranks, n)
    p_yes = None
    if pos_p or neg_p:
        p_yes = {
            "pairwise_accuracy": round(wins / pairs, 6) if pairs else None,
            "pairs": pairs,
            "mean_positive": round(float(np.mean(pos_p)), 6) if pos_p else None,
            "mean_negative": round(float(np.mean(neg_p)), 6) if neg_p else None,
        }
    return {
        "queries": n,
        "queries_with_positive": with_pos,
        "held_out": held_out,
        "cos": cos,
        "fused": fused,
        "p_yes": p_yes,
        "fusion_beats_cos": fused["mrr"] > cos["mrr"],
    }


def describe(quality: Mapping[str, Any]) -> str:
    """One line for logs: fused vs cos MRR on how many (held-out or trained) queries."""
    which = "held-out" if quality.get("held_out") else "trained-on"
    return (
        f"teacher MRR@K {quality['fused']['mrr']:.4f} (cos alone {quality['cos']['mrr']:.4f}) on "
        f"{quality['queries']} {which} queries ({quality['queries_with_positive']} with a positive in the top-K)"
    )
