"""String ids <-> the int64 labels a faiss IDMap stores.

M-BEIR candidate ids ("<dataset_id>:<n>") become `did_to_int` labels, so a saved `.faiss` file
is meaningful on its own (the serve layer or another tool can decode a label without our id
file). Any other id set gets positional labels 0..N-1. Either way the string array is kept,
position-aligned with the vectors, because search maps positions straight back to strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from umarvel_ray.data.mbeir import did_to_int, int_to_did

MBEIR = "mbeir"
POSITIONAL = "positional"


def as_id_array(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids as a 1-D object array of str (one representation for every index backend)."""
    arr = np.asarray(ids, dtype=object).reshape(-1)
    if len(arr) and not all(isinstance(s, str) for s in arr):
        raise TypeError("ids must be strings")
    return arr


def mbeir_labels(ids: np.ndarray) -> np.ndarray | None:
    """did_to_int labels when every id is a canonical M-BEIR id (round-trips exactly), else None."""
    try:
        labels = np.fromiter((did_to_int(s) for s in ids), dtype=np.int64, count=len(ids))
    except ValueError:
        return None
    # "9:012" would map onto "9:12": only canonical spellings keep the mapping invertible.
    if any(int_to_did(int(lab)) != s for lab, s in zip(labels, ids, strict=True)):
        return None
    return labels


def check_unique(ids: np.ndarray) -> None:
    """Duplicate ids would be returned twice by search and double-count in metrics."""
    if len(set(ids.tolist())) != len(ids):
        seen: set[str] = set()
        dups = [s for s in ids.tolist() if s in seen or seen.add(s)]
        raise ValueError(f"{len(dups)} duplicate ids, e.g. {dups[:3]}")


def make_labels(ids: np.ndarray, scheme: str, offset: int = 0) -> np.ndarray:
    """int64 labels for `ids` under `scheme`; positional labels continue from `offset`."""
    if scheme == MBEIR:
        labels = mbeir_labels(ids)
        if labels is None:
            raise ValueError("ids are not canonical M-BEIR ids '<dataset_id>:<n>'")
        return labels
    if scheme == POSITIONAL:
        return np.arange(offset, offset + len(ids), dtype=np.int64)
    raise ValueError(f"unknown id scheme {scheme!r}")


def choose_scheme(ids: np.ndarray) -> str:
    """MBEIR when the first batch of ids is canonical M-BEIR, else POSITIONAL."""
    return MBEIR if len(ids) and mbeir_labels(ids) is not None else POSITIONAL
