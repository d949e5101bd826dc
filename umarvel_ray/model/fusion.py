"""U-MARVEL+ score fusion, the one place it is computed: score = cos + w * P(Yes).

docs/RECIPE.md section 3: the distillation teacher scores a retrieved candidate with
cos + w * P(Yes) (w = 1; 0.5 for MSCOCO t->i, 0.1 for MSCOCO i->t), and U-MARVEL+ reranks the
retriever's top-50 at query time with cos + 0.1 * P(Yes). `cos` is the embedder's cosine
similarity (in [-1, 1]), `P(Yes)` the re-ranker's softmax probability of "Yes" over {Yes, No}
(in [0, 1]). The teacher (teacher/scores.py), the evaluation's reranking (eval/rerank.py) and the
serving ingress (serve/fusion.py) all call these functions; `pairwise_wins` is the judge's one
pairwise-accuracy rule (train/reranker_heldout.py, teacher/quality.py). No torch: cheap to import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def fused_scores(cos: Sequence[float], p_yes: Sequence[float], weight: float) -> list[float]:
    """cos + weight * p_yes position by position, in double precision (Python floats).

    Raises ValueError when the two lists differ in length (a pair lost on the way).
    """
    if len(cos) != len(p_yes):
        raise ValueError(f"{len(cos)} cosines for {len(p_yes)} rerank scores")
    return [float(c) + weight * float(p) for c, p in zip(cos, p_yes, strict=True)]


def task_weight(task: str, default: float, weights: Mapping[str, float]) -> float:
    """w of `task` in cos + w * P(Yes): its entry in `weights` (by task name), else `default`."""
    return float(weights.get(task, default))


def rank_fused(ids: Sequence[str], cos: Sequence[float], p_yes: Sequence[float], weight: float) -> list[int]:
    """Positions ordered by fused score descending, ties by id ascending (the index's tie rule)."""
    fused = fused_scores(cos, p_yes, weight)
    return sorted(range(len(ids)), key=lambda i: (-fused[i], ids[i]))


def pairwise_wins(positives: Sequence[float], negatives: Sequence[float]) -> tuple[int, int]:
    """(wins, pairs) of one query's re-ranker scores: pairs = len(positives) * len(negatives), wins =
    the (positive, negative) pairs whose positive scores strictly higher (a tie is a loss, so a
    constant judge scores 0). Summed over queries, wins / pairs is the pairwise accuracy the
    re-ranker's held-out check and the teacher's quality report."""
    wins = sum(1 for p in positives for n in negatives if float(p) > float(n))
    return wins, len(positives) * len(negatives)


__all__ = ["fused_scores", "pairwise_wins", "rank_fused", "task_weight"]
