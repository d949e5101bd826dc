"""The negative-selection rules of mining (pure functions, unit tested on their own).

- "umarvel" (U-MARVEL's first-`num` rule): walk the ranked list, skip labelled positives (and,
  with `max_score`, candidates scoring above it: likely false negatives), keep the first `num`;
  pad by repeating when short.
- "mmembed" (MM-Embed's modality-aware hard negatives): C1 = wrong-modality candidates ranked
  above the first positive, C2 = right-modality candidates at ranks 46-50 (1-based,
  configurable); sample `num` from C1 u C2 with a per-query RNG seeded by (seed, qid); pad by
  repeating when short.

Two false-negative filters apply to either rule, before it picks:
- `max_score` (U-MARVEL's ablation, 0.7 there): drop candidates scoring strictly above it.
- `margin` (NV-Retriever's positive-aware "TopK-MarginPos", Moreira et al. 2024, arXiv:2407.15831;
  sentence-transformers' `mine_hard_negatives(absolute_margin=...)` is the same rule): drop
  candidates scoring strictly above (the positive's score - margin). The anchor is the best-scoring
  labelled positive in the ranked list. When no positive was retrieved, every retrieved candidate
  scores at least as high as every positive (the list is the exact top-k of a pool that holds the
  positives), so with margin >= 0 the rule drops them all: that query gets no negatives.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from umarvel_ray.index.base import PAD_ID  # the id the index pads rows shorter than k with

STRATEGIES = ("umarvel", "mmembed")


@dataclass
class Selection:
    """Negatives of one query and how they were found.

    `n_candidates` is the number of distinct eligible candidates the rule could draw from (before
    truncation to `num` and before padding): < num means padded, 0 means no negatives at all.
    """

    neg_dids: list[str]
    n_candidates: int
    n_positives_skipped: int = 0
    n_filtered: int = 0
    n_c1: int = 0
    n_c2: int = 0
    n_margin: int = 0


def pad_repeat(items: Sequence[str], num: int) -> list[str]:
    """`items` cycled to exactly `num` entries ([a, b] -> [a, b, a, b, a]); [] stays []."""
    if not items:
        return []
    return [items[i % len(items)] for i in range(num)]


def _modality_lookup(cand_modality: Mapping[str, str] | Callable[[str], str] | None) -> Callable[[str], str]:
    if cand_modality is None:
        raise ValueError("strategy 'mmembed' needs cand_modality (a did -> modality mapping or callable)")
    if callable(cand_modality) and not isinstance(cand_modality, Mapping):
        return cand_modality
    table = cand_modality

    def lookup(did: str) -> str:
        try:
            return table[did]
        except KeyError:
            raise KeyError(f"no modality known for candidate {did!r}") from None

    return lookup


def _margin_filter(
    eligible: list[tuple[int, str, float]],
    ranked_ids: Sequence[str],
    ranked_scores: Sequence[float],
    positives: set[str],
    margin: float | None,
) -> tuple[list[tuple[int, str]], int]:
    """(rank, did) of `eligible` that the positive-aware margin rule keeps, and how many it dropped.

    Threshold = max score of a labelled positive in the list - margin; no positive retrieved means
    no candidate is kept (each outscores every positive). `margin` None keeps all.
    """
    if margin is None:
        return [(r, d) for r, d, _ in eligible], 0
    pairs = zip(ranked_ids, ranked_scores, strict=True)
    anchor = max((float(s) for d, s in pairs if d in positives), default=None)
    if anchor is None:
        return [], len(eligible)
    kept = [(r, d) for r, d, s in eligible if s <= anchor - margin]
    return kept, len(eligible) - len(kept)


def select_negatives(
    ranked_ids: Sequence[str],
    ranked_scores: Sequence[float],
    positives: Iterable[str],
    num: int = 5,
    strategy: str = "umarvel",
    max_score: float | None = None,
    cand_modality: Mapping[str, str] | Callable[[str], str] | None = None,
    query_target_modality: str | None = None,
    rng: random.Random | None = None,
    c2_ranks: tuple[int, int] | Sequence[int] = (46, 50),
    margin: float | None = None,
) -> Selection:
    """Pick `num` hard negatives from one query's ranked list (best first).

    Padding ids ("") are ignored; labelled positives are never returned; with `max_score`,
    candidates scoring strictly above it are dropped (counted in `n_filtered`); with `margin` (>= 0),
    candidates scoring strictly above (best retrieved positive's score - margin) are dropped, all
    of them when no positive was retrieved (counted in `n_margin`; a candidate both filters drop
    counts in `n_filtered` only). "umarvel" keeps the first `num` eligible
    candidates in rank order. "mmembed" samples (with `rng`) from C1 u C2: C1 = eligible
    candidates whose modality differs from `query_target_modality` ranked above the first
    positive (all of the list when no positive was retrieved), C2 = eligible right-modality
    candidates at 1-based ranks `c2_ranks[0]..c2_ranks[1]`; the sample is returned in rank order.
    Both pad by repeating when fewer than `num` are eligible; none eligible -> `neg_dids == []`.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(ranked_ids) != len(ranked_scores):
        raise ValueError(f"{len(ranked_ids)} ids but {len(ranked_scores)} scores")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0 or None, got {margin}")
    pos = set(positives)
    scored: list[tuple[int, str, float]] = []  # (0-based rank, did, score)
    seen: set[str] = set()
    first_pos: int | None = None
    n_pos = n_filtered = 0
    for rank, (did, score) in enumerate(zip(ranked_ids, ranked_scores, strict=True)):
        if did == PAD_ID or did in seen:
            continue
        seen.add(did)
        if did in pos:
            n_pos += 1
            if first_pos is None:
                first_pos = rank
            continue
        if max_score is not None and float(score) > max_score:
            n_filtered += 1
            continue
        scored.append((rank, did, float(score)))
    eligible, n_margin = _margin_filter(scored, ranked_ids, ranked_scores, pos, margin)

    if strategy == "umarvel":
        chosen = [d for _, d in eligible[:num]]
        return Selection(pad_repeat(chosen, num), len(eligible), n_pos, n_filtered, n_margin=n_margin)

    if query_target_modality is None:
        raise ValueError("strategy 'mmembed' needs query_target_modality")
    if rng is None:
        raise ValueError("strategy 'mmembed' needs an rng")
    lo, hi = int(c2_ranks[0]), int(c2_ranks[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"c2_ranks must satisfy 1 <= lo <= hi, got {lo}, {hi}")
    modality_of = _modality_lookup(cand_modality)
    above = len(ranked_ids) if first_pos is None else first_pos
    c1 = [(r, d) for r, d in eligible if r < above and modality_of(d) != query_target_modality]
    c2 = [(r, d) for r, d in eligible if lo - 1 <= r <= hi - 1 and modality_of(d) == query_target_modality]
    pool = sorted(c1 + c2)
    if len(pool) > num:
        pool = sorted(rng.sample(pool, num))
    chosen = [d for _, d in pool]
    return Selection(
        pad_repeat(chosen, num), len(c1) + len(c2), n_pos, n_filtered, len(c1), len(c2), n_margin
    )
