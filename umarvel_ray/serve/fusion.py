"""U-MARVEL+ rerank fusion: final score = retrieval cosine + w * P(Yes)."""

from __future__ import annotations

from collections.abc import Sequence


def fuse(cosines: Sequence[float], p_yes: Sequence[float], weight: float) -> list[float]:
    """Fused scores, position by position."""
    if len(cosines) != len(p_yes):
        raise ValueError(f"{len(cosines)} cosines for {len(p_yes)} rerank scores")
    return [float(c) + weight * float(p) for c, p in zip(cosines, p_yes, strict=True)]


def rank_fused(ids: Sequence[str], cosines: Sequence[float], p_yes: Sequence[float], weight: float) -> list[int]:
    """Positions ordered by fused score descending, ties by id ascending (the index's tie rule)."""
    fused = fuse(cosines, p_yes, weight)
    return sorted(range(len(ids)), key=lambda i: (-fused[i], ids[i]))
