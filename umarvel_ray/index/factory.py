"""Which faiss factory a pool of a given size gets: the approximate one, or exact search.

An approximate factory trains k-means codebooks: IVF<n> clusters the training vectors into n
lists, PQ<m>x<b> (b = 8 by default) clusters each sub-vector into 2**b centroids. faiss raises
(a C++ exception) when there are fewer training points than centroids, and warns below 39 points
per centroid ("please provide at least 39*k training points", faiss/Clustering.cpp,
`ClusteringParameters::min_points_per_centroid = 39`). So the rule, the same for every pool:

    a factory applies to a pool only when its training sample (min(pool size, train_rows))
    has at least 39 x (largest centroid count in the factory) vectors; smaller pools are
    searched exactly ("Flat", or "SQfp16" with fp16 storage), which on such pools is also fast.

M-BEIR needs this: one evaluation has local pools of 5,000 to 1,047,067 candidates and a union
pool of 5.6M, and one factory string is given for all of them.
"""

from __future__ import annotations

import re

MIN_POINTS_PER_CENTROID = 39
EXACT_FACTORY = "Flat"
RULE = (
    f"an approximate factory applies to a pool only when its training sample has at least "
    f"{MIN_POINTS_PER_CENTROID} x (IVF lists, or 2**bits PQ centroids) vectors (faiss's own minimum "
    f"per centroid); smaller pools are searched exactly (Flat)"
)


def centroids(factory: str) -> int:
    """Largest k-means centroid count the factory trains (0 for Flat / HNSW / SQ, which need none)."""
    f = factory.replace(" ", "")
    counts = [int(n) for n in re.findall(r"IVF(\d+)", f)]
    for m in re.finditer(r"(?<![A-Za-z])O?PQ(\d+)(?:x(\d+))?", f):
        counts.append(2 ** int(m.group(2) or 8))
    return max(counts, default=0)


def min_train_vectors(factory: str) -> int:
    """Training vectors the factory needs under the rule above (0: no training)."""
    return MIN_POINTS_PER_CENTROID * centroids(factory)


def factory_for_pool(factory: str, train_vectors: int) -> tuple[str, str | None]:
    """(factory to use, why it was replaced or None) for a pool whose training sample has
    `train_vectors` rows."""
    need = min_train_vectors(factory)
    if need and train_vectors < need:
        why = (
            f"{train_vectors} training vectors < {MIN_POINTS_PER_CENTROID} x {centroids(factory)} = {need} "
            f"needed by {factory!r}: exact search instead"
        )
        return EXACT_FACTORY, why
    return factory, None


__all__ = ["EXACT_FACTORY", "MIN_POINTS_PER_CENTROID", "RULE", "centroids", "factory_for_pool", "min_train_vectors"]
