"""Retrieval indexes: faiss (CPU/GPU) and torch exact search behind one `SearchIndex` API."""

from umarvel_ray.index.base import PAD_ID, NonFiniteVectorError, SearchIndex, merge_topk
from umarvel_ray.index.build import build_index_from_embeddings
from umarvel_ray.index.faiss_index import FaissIndex, require_faiss
from umarvel_ray.index.search import (
    ExactIndex,
    ShardedIndex,
    build_index,
    load_index,
    new_index,
    read_index_meta,
)
from umarvel_ray.index.torch_index import TorchExactIndex

__all__ = [
    "PAD_ID",
    "NonFiniteVectorError",
    "ExactIndex",
    "FaissIndex",
    "SearchIndex",
    "ShardedIndex",
    "TorchExactIndex",
    "build_index",
    "build_index_from_embeddings",
    "load_index",
    "merge_topk",
    "new_index",
    "read_index_meta",
    "require_faiss",
]
