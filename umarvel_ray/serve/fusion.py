"""U-MARVEL+ rerank fusion for the ingress: final score = retrieval cosine + w * P(Yes).

The arithmetic lives in `model.fusion` (shared with the teacher and the evaluation's reranking);
these are its names as the serving code and its tests know them.
"""

from __future__ import annotations

from umarvel_ray.model.fusion import fused_scores as fuse
from umarvel_ray.model.fusion import rank_fused

__all__ = ["fuse", "rank_fused"]
