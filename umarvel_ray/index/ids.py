"""String ids <-> the int64 labels a faiss IDMap stores, and vectorised id hashing.

M-BEIR candidate ids ("<dataset_id>:<n>") become `did_to_int` labels, so a saved `.faiss` file
is meaningful on its own (the serve layer or another tool can decode a label without our id
file). Any other id set gets positional labels 0..N-1. Either way the string array is kept,
position-aligned with the vectors, because search maps positions straight back to strings.

Every whole-pool pass here is vectorised (pyarrow compute over the ids' UTF-8 buffer, numpy over
its bytes), never a Python loop per id: 5.6M M-BEIR ids are labelled in about a second, where a
`did_to_int` loop took about 14 s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umarvel_ray.data.mbeir import DID_STRIDE

MBEIR = "mbeir"
POSITIONAL = "positional"

# Canonical candidate ids (mbeir._ID_RE with n < DID_STRIDE), in RE2 syntax: `$` is the end of the
# text (Python's also matched before a final "\n"). A dataset id of more than 12 digits can never
# give an int64 label; up to 12 the label is range-checked below in uint64.
_CANONICAL_DID = r"^(0|[1-9][0-9]{0,11}):(0|[1-9][0-9]{0,6})$"
_INT64_MAX = np.uint64(np.iinfo(np.int64).max)

# FNV-1a (64-bit) over each id's UTF-8 bytes, then the splitmix64 finaliser (spreads the bits so
# sorted hashes split evenly). Ids longer than _LONG_ID bytes are hashed one by one (blake2b).
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_LONG_ID = 256


def as_id_array(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids as a 1-D object array of str (one representation for every index backend)."""
    arr = np.asarray(ids, dtype=object).reshape(-1)
    if len(arr) and not all(isinstance(s, str) for s in arr):
        raise TypeError("ids must be strings")
    return arr


def as_arrow_ids(ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    """Ids as one arrow large_string array (int64 offsets); TypeError on a non-string or null id."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    if not isinstance(ids, pa.Array):
        obj = np.asarray(ids, dtype=object).reshape(-1)
        if len(obj) == 0:
            return pa.array([], pa.large_string())
        try:
            ids = pa.array(obj)  # type inference: several times faster than pa.array(obj, pa.string())
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise TypeError(f"ids must be strings: {exc}") from None
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise TypeError(f"ids must be strings, got arrow type {ids.type}")
    if ids.null_count:
        raise TypeError(f"ids must be strings, got {ids.null_count} null ids")
    return ids.cast(pa.large_string())


def mbeir_labels(ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """did_to_int labels (int64 [N]) when every id is a canonical M-BEIR id, else None.

    Same labels as `did_to_int` per id ("9:123" -> 90_000_123). Non-canonical spellings ("9:012"
    would map onto "9:12") give None, so the mapping stays invertible; so does a dataset id too
    large for an int64 label (where the per-id loop used to raise OverflowError).
    """
    arr = as_arrow_ids(ids)
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    if not pc.all(pc.match_substring_regex(arr, _CANONICAL_DID)).as_py():
        return None
    parts = pc.split_pattern(arr, ":", max_splits=1).flatten()
    ds_n = pc.cast(parts, pa.uint64()).to_numpy().reshape(-1, 2)
    labels = ds_n[:, 0] * np.uint64(DID_STRIDE) + ds_n[:, 1]  # <= 10^12 * 10^7: no uint64 wrap
    if (labels > _INT64_MAX).any():
        return None
    return labels.astype(np.int64)


def id_hashes(ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash per id (uint64 [N]), vectorised over the ids' UTF-8 bytes.

    Equal ids always hash equal; distinct ids collide with probability ~2^-64 per pair, so every
    user of these hashes confirms a hash match on the strings before calling two ids equal.
    Costs one numpy pass per byte position of the longest id (ids are short), not one per id.
    """
    arr = as_arrow_ids(ids)
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2] or b"", np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, np.uint64)
    short = np.flatnonzero(lengths <= _LONG_ID)
    order = short[np.argsort(-lengths[short], kind="stable")]  # longest first: active rows are a prefix
    s_starts, s_lengths, hs = starts[order], lengths[order], h[order]
    neg_lengths = -s_lengths  # ascending
    for j in range(int(s_lengths[0]) if len(order) else 0):
        n_active = int(np.searchsorted(neg_lengths, -j, side="left"))  # rows longer than j bytes
        hs[:n_active] ^= data[s_starts[:n_active] + j]
        hs[:n_active] *= _FNV_PRIME
    h[order] = hs
    for i in np.flatnonzero(lengths > _LONG_ID):
        h[i] = int.from_bytes(hashlib.blake2b(arr[int(i)].as_py().encode(), digest_size=8).digest(), "little")
    h ^= lengths.astype(np.uint64)
    return _splitmix64(h)


def _splitmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def first_occurrences(ids: Any, hashes: np.ndarray | None = None) -> np.ndarray:
    """For each id, the position of its first occurrence in `ids` (int64 [N]; its own if first).

    Vectorised by hash: only rows whose hash repeats are compared as strings, so a hash collision
    between distinct ids never makes them equal, and no per-id Python object is kept.
    """
    h = id_hashes(ids) if hashes is None else hashes
    first = np.arange(len(h), dtype=np.int64)
    if len(h) < 2:
        return first
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    if not same.any():
        return first
    in_group = np.zeros(len(h), bool)
    in_group[1:] |= same
    in_group[:-1] |= same
    suspects = np.sort(order[in_group])  # every row whose hash occurs more than once
    strings = as_arrow_ids(ids).take(pa.array(suspects)).to_pylist()
    seen: dict[str, int] = {}  # only the suspects: true duplicates and hash collisions
    for p, s in zip(suspects.tolist(), strings, strict=True):
        first[p] = seen.setdefault(s, p)
    return first


def duplicate_positions(ids: Any, hashes: np.ndarray | None = None) -> np.ndarray:
    """Positions (int64, ascending) of ids equal to an earlier id in `ids`."""
    first = first_occurrences(ids, hashes)
    return np.flatnonzero(first != np.arange(len(first)))


def check_unique(ids: Any) -> None:
    """Duplicate ids would be returned twice by search and double-count in metrics."""
    dups = duplicate_positions(ids)
    if len(dups):
        arr = as_arrow_ids(ids)
        raise ValueError(f"{len(dups)} duplicate ids, e.g. {arr.take(pa.array(dups[:3])).to_pylist()}")


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
