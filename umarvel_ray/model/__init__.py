"""Model layer: backbone loading, input rendering, the bi-encoder embedder and the pointwise reranker.

Names are resolved lazily so that `import umarvel_ray.model.losses` (or config parsing) does not
pull in transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_backbone": "backbone",
    "load_processor": "backbone",
    "InputConfig": "inputs",
    "Collator": "inputs",
    "Embedder": "embedder",
    "EmbedderConfig": "embedder",
    "LoraConfig": "embedder",
    "Reranker": "reranker",
    "RerankerConfig": "reranker",
    "make_tiny_qwen2vl": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
