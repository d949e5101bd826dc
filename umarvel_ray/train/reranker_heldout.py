"""Held-out quality of the re-ranker: does it judge queries it never trained on?

With `holdout_fraction` > 0 the re-ranker trains on the `train` split of the M-BEIR train queries
(data/holdout.py) and, once merged, rank 0 scores the held-out queries' pairs with the in-memory
merged judge (the very weights just written to `<output>/model`): per query its epoch-0 positive
and instruction (`MBEIRTrain.example(q, 0)`) against every distinct mined negative of that query,
or its first `heldout_negatives` (pool=local mining keeps rank order: the stage-3 model's hardest
same-task, same-modality distractors).

    pairwise accuracy = #{(q, n): P(Yes | q, pos_q) > P(Yes | q, n)} / #{(q, n)}

over all (positive, negative) pairs of the same query (a tie counts as wrong), plus the mean P(Yes)
of the positives and of the negatives. A judge that ranks nothing (constant P(Yes)) scores 0.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umarvel_ray.model.fusion import pairwise_wins

log = logging.getLogger(__name__)


def heldout_metrics(pos: Sequence[float], negs: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Pairwise accuracy and mean P(Yes) from per-query scores.

    `pos[i]` is query i's P(Yes) for its positive, `negs[i]` its negatives' P(Yes). Returns
    {queries, pairs, pairwise_accuracy, mean_p_yes_pos, mean_p_yes_neg}; the three rates are None
    when there is no pair. Raises ValueError when the two lists differ in length.
    """
    if len(pos) != len(negs):
        raise ValueError(f"{len(pos)} positive scores but {len(negs)} negative lists")
    counts = [pairwise_wins([p], ns) for p, ns in zip(pos, negs, strict=True)]
    wins, pairs = sum(w for w, _ in counts), sum(n for _, n in counts)
    flat = [float(n) for ns in negs for n in ns]
    return {
        "queries": len(pos),
        "pairs": pairs,
        "pairwise_accuracy": wins / pairs if pairs else None,
        "mean_p_yes_pos": sum(map(float, pos)) / len(pos) if pairs else None,
        "mean_p_yes_neg": sum(flat) / len(flat) if pairs else None,
    }


def heldout_groups(cfg: Any) -> list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    """(query item, positive item, [negative items]) of the first `heldout_max_queries` held-out
    queries that have a positive and a mined negative: each query's distinct mined negatives in
    file order (rank order), the first `heldout_negatives` of them when set; image paths."""
    from umarvel_ray.train.data import MBEIRTrain, mbeir_train_inputs

    queries, pool = mbeir_train_inputs(cfg)
    held = MBEIRTrain(
        queries,
        pool,
        cfg.data_path(cfg.instructions_file),
        cfg.seed,
        negatives_path=cfg.negatives_path(),
        num_negatives=1,
        holdout_fraction=cfg.holdout_fraction,
        split="heldout",
    )
    n = len(held) if not cfg.heldout_max_queries else min(len(held), cfg.heldout_max_queries)
    out = []
    for i in range(n):
        ex = held.example(i, 0)
        negs = list(dict.fromkeys(held.negatives[held.queries[i]["qid"]]))
        negs = negs[: cfg.heldout_negatives] if cfg.heldout_negatives else negs
        out.append((ex["query"], ex["positive"], [held.pool.item(d) for d in negs]))
    return out


def score_heldout(cfg: Any, reranker: Any) -> dict[str, Any]:
    """Score the held-out pairs with `reranker` (`Reranker.score`) and return `heldout_metrics`
    plus `skipped` (queries with an undecodable image) and `seconds`."""
    from umarvel_ray.data.images import ImageDecodeError, load_image

    t0 = time.perf_counter()
    inputs = reranker.cfg.inputs
    budget = {k: v for k, v in (("min_pixels", inputs.min_pixels), ("max_pixels", inputs.max_pixels)) if v}
    root = Path(cfg.data_root or ".")

    def decode(item: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(item.get("image"), str):
            return item
        return {**item, "image": load_image(root, item["image"], **budget)}

    flat: list[tuple[dict[str, Any], dict[str, Any]]] = []
    sizes: list[int] = []
    skipped = 0
    for q, p, negs in heldout_groups(cfg):
        try:
            qd = decode(q)
            group = [(qd, decode(c)) for c in [p, *negs]]
        except ImageDecodeError as e:
            skipped += 1
            log.warning("held-out query skipped: %s", e.reason)
            continue
        flat += group
        sizes.append(len(group))
    scores = reranker.score(flat, batch_size=cfg.heldout_batch).tolist() if flat else []
    pos, negs_s, at = [], [], 0
    for size in sizes:
        pos.append(scores[at])
        negs_s.append(scores[at + 1 : at + size])
        at += size
    out = heldout_metrics(pos, negs_s)
    out.update(skipped=skipped, seconds=round(time.perf_counter() - t0, 2))
    return out


def heldout_message(m: dict[str, Any]) -> str:
    """The log line of a held-out result."""
    if m.get("pairwise_accuracy") is None:
        return f"reranker held-out: no pair to score ({m.get('queries', 0)} queries)"
    return (
        f"reranker held-out: {m['queries']} queries, {m['pairs']} (pos, neg) pairs, pairwise accuracy "
        f"{m['pairwise_accuracy']:.3f}, mean P(Yes) pos {m['mean_p_yes_pos']:.3f} neg {m['mean_p_yes_neg']:.3f}"
        f" ({m['seconds']:.1f} s)"
    )


def summary_fields(summary_file: Path) -> dict[str, Any]:
    """Held-out fields of a finished run's train_summary.json for the SUMMARY line ({} if none)."""
    if not summary_file.is_file():
        return {}
    held = json.loads(summary_file.read_text()).get("heldout") or {}
    keys = ("pairwise_accuracy", "mean_p_yes_pos", "mean_p_yes_neg", "queries", "pairs")
    return {
        f"heldout_{k}": (f"{held[k]:.4f}" if isinstance(held[k], float) else held[k]) for k in keys if k in held
    }
