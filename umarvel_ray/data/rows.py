"""One M-BEIR input line -> the model item the embedder and the re-ranker see (`parse_row`).

Shared by the embedding pipeline's CPU stage (`embed.decode`) and the re-ranker's pair decoding
(`rerank.pairs`), so a query or candidate is built the same way in both: same text rule, same
seeded instruction per qid, same image decoding under a pixel budget. Bad rows raise `RowReject`
(field, reason); callers turn it into a reject record, never a crash.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

KINDS = ("candidate", "query")

# Field names per input kind: (id, text, image path, modality).
FIELDS = {
    "candidate": ("did", "txt", "img_path", "modality"),
    "query": ("qid", "query_txt", "query_img_path", "query_modality"),
}


@lru_cache(maxsize=4)
def _instructions(path: str) -> Any:
    from umarvel_ray.data.instructions import read_instructions

    return read_instructions(path)


def query_rng(seed: int, qid: str) -> random.Random:
    """The per-query RNG for random instructions: depends on (seed, qid) only, not on order."""
    return random.Random(f"{seed}:{qid}")


class RowReject(Exception):
    """A bad input row: the field at fault and why."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


def _present(v: Any) -> bool:
    """A text or image slot is filled when it is a non-blank string (the data layer's rule)."""
    return isinstance(v, str) and v.strip() != ""


def parse_row(
    raw: bytes,
    kind: str,
    data_root: str,
    instructions_path: str | None,
    prompt_index: int | None,
    seed: int,
    min_pixels: int,
    max_pixels: int,
    text_rule: str = "uniir",
) -> tuple[str, dict[str, Any], str]:
    """One input line (content bytes, no line end) -> (id, item with a decoded image or None, modality).

    The line is decoded and parsed by `data.jsonl.parse_json`; texts follow `text_rule`
    (`model_items.TEXT_RULES`: UniIR's format_string, or none).

    Raises `RowReject` for a malformed line, an empty item, any record problem the data layer's
    `check_pool_record` / `check_query_record` reports (bad id, unknown modality, modality that
    disagrees with the record, ...), a missing instruction, or a missing / corrupt image.
    """
    from umarvel_ray.data import mbeir, model_items
    from umarvel_ray.data.images import ImageDecodeError, load_image
    from umarvel_ray.data.jsonl import parse_json

    id_key, txt_key, img_key, mod_key = FIELDS[kind]
    row, err = parse_json(raw)
    if err is not None:
        raise RowReject("<json>", err)
    if not isinstance(row, dict):
        raise RowReject("<record>", f"expected a json object, got {type(row).__name__}")
    if not _present(row.get(txt_key)) and not _present(row.get(img_key)):
        raise RowReject(f"{txt_key}+{img_key}", "empty item: neither text nor image")
    check = mbeir.check_query_record if kind == "query" else mbeir.check_pool_record
    issues = check(row)
    if issues:
        raise RowReject(*issues[0])
    rid = row[id_key]
    try:
        if kind == "query":
            instructions = _instructions(instructions_path)
            if prompt_index is not None:
                item = model_items.query_item(row, instructions, prompt_index=prompt_index, text_rule=text_rule)
            else:
                item = model_items.query_item(row, instructions, rng=query_rng(seed, rid), text_rule=text_rule)
        else:
            item = model_items.candidate_item(row, text_rule=text_rule)
    except (KeyError, IndexError, ValueError) as exc:
        raise RowReject("instruction" if kind == "query" else "<record>", str(exc).strip("'\"")) from None
    if item["text"] is None and not item.get("image"):
        raise RowReject(txt_key, f"no text left under text rule {text_rule!r}: {row.get(txt_key)!r}")
    image = None
    if item.get("image"):
        try:
            image = load_image(data_root, item["image"], min_pixels=min_pixels, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            reason = exc.reason if item["image"] in exc.reason else f"{exc.reason}: {item['image']}"
            raise RowReject(img_key, reason) from None
    return rid, {**item, "image": image}, row[mod_key]


__all__ = ["FIELDS", "KINDS", "RowReject", "parse_row", "query_rng"]
