"""The CPU stage of pair scoring: one input row per query (byte ranges of its line and of its
candidates' lines) -> one output row per (query, candidate) pair, images decoded and resized.

Input rows (plain dicts, the items of the Ray dataset):
    group   int        the caller's grouping key (the teacher's shard; the evaluation's row number)
    qid     str        the query id (for logs and the caller's bookkeeping)
    q_file  int        index into `files` of the query's jsonl file; q_off, q_len: its line's byte range
    c_file  int        index into `files` of the candidates' jsonl file
    c_offs, c_lens     byte ranges of the candidates' lines, in the caller's order (-> `rank`)
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from umarvel_ray.data.rows import RowReject, parse_row
from umarvel_ray.rerank.offsets import read_at

PAIR_COLUMNS = (
    "group",
    "qid",
    "rank",
    "q_text",
    "q_instruction",
    "q_image",
    "q_h",
    "q_w",
    "c_text",
    "c_image",
    "c_h",
    "c_w",
    "reject",
)
_INT_COLUMNS = ("group", "rank", "q_h", "q_w", "c_h", "c_w")


@dataclass
class PairInputs:
    """What the decode tasks read: the jsonl files rows point into and how items are built
    (`data.rows.parse_row`: data_root for images, the instruction file and choice, the text rule,
    the re-ranker's pixel budget)."""

    files: list[str]
    data_root: str
    instructions_path: str | None
    prompt_index: int | None
    seed: int
    min_pixels: int
    max_pixels: int
    text_rule: str = "uniir"

    def decode_kwargs(self) -> dict[str, Any]:
        """`decode_pairs` keyword arguments."""
        return asdict(self)


def image_from_bytes(data: bytes | None, h: int, w: int) -> np.ndarray | None:
    """Rebuild the HxWx3 uint8 array `decode_pairs` flattened (None when there is none)."""
    if data is None or int(h) == 0:
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(int(h), int(w), 3)


def _columns(cols: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, values in cols.items():
        if name in _INT_COLUMNS:
            out[name] = np.asarray(values, dtype=np.int32)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
    return out


def decode_pairs(
    batch: dict[str, np.ndarray],
    *,
    files: list[str],
    data_root: str,
    instructions_path: str | None,
    prompt_index: int | None,
    seed: int,
    min_pixels: int,
    max_pixels: int,
    text_rule: str = "uniir",
) -> dict[str, np.ndarray]:
    """CPU stage: query rows -> one row per pair (columns `PAIR_COLUMNS`).

    Items are built exactly as the embedding pipeline builds them (`parse_row`: same text rule,
    same seeded instruction per qid); images leave as raw resized uint8 bytes. A query or
    candidate that cannot be decoded yields rows with `reject` set ("<kind> <field>: <reason>"),
    not an exception.
    """
    cols: dict[str, list[Any]] = {c: [] for c in PAIR_COLUMNS}
    args = (data_root, instructions_path, prompt_index, seed, min_pixels, max_pixels, text_rule)

    def parse(raw: bytes, kind: str) -> tuple[dict[str, Any] | None, str]:
        try:
            return parse_row(raw, kind, *args)[1], ""
        except RowReject as exc:
            return None, f"{kind} {exc.field}: {exc.reason}"

    with ExitStack() as stack:
        handles: dict[int, Any] = {}

        def opened(i: int) -> Any:
            if int(i) not in handles:
                handles[int(i)] = stack.enter_context(open(files[int(i)], "rb"))
            return handles[int(i)]

        for j in range(len(batch["qid"])):
            q_item, q_rej = parse(read_at(opened(batch["q_file"][j]), batch["q_off"][j], batch["q_len"][j]), "query")
            q_img = q_item.get("image") if q_item else None
            fc = opened(batch["c_file"][j])
            for rank, (c_off, c_len) in enumerate(zip(batch["c_offs"][j], batch["c_lens"][j], strict=True)):
                c_item, c_rej = parse(read_at(fc, c_off, c_len), "candidate")
                c_img = c_item.get("image") if c_item else None
                cols["group"].append(int(batch["group"][j]))
                cols["qid"].append(str(batch["qid"][j]))
                cols["rank"].append(rank)
                cols["q_text"].append(q_item.get("text") if q_item else None)
                cols["q_instruction"].append(q_item.get("instruction") if q_item else None)
                cols["q_image"].append(None if q_img is None else np.ascontiguousarray(q_img).tobytes())
                cols["q_h"].append(0 if q_img is None else int(q_img.shape[0]))
                cols["q_w"].append(0 if q_img is None else int(q_img.shape[1]))
                cols["c_text"].append(c_item.get("text") if c_item else None)
                cols["c_image"].append(None if c_img is None else np.ascontiguousarray(c_img).tobytes())
                cols["c_h"].append(0 if c_img is None else int(c_img.shape[0]))
                cols["c_w"].append(0 if c_img is None else int(c_img.shape[1]))
                cols["reject"].append(q_rej or c_rej)
    return _columns(cols)


__all__ = ["PAIR_COLUMNS", "PairInputs", "decode_pairs", "image_from_bytes"]
