"""What the model is given for an M-BEIR record: its text under a text rule, its image, its instruction.

The embedding pipeline, training, evaluation and serving all build their model items here, so a
query or candidate reads the same to the model whichever job sees it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from umarvel_ray.data.catalogue import task_modalities
from umarvel_ray.data.instructions import Instructions
from umarvel_ray.data.mbeir import present, split_id

TEXT_RULES = ("uniir", "none")


def normalize_text(s: str | None) -> str:
    """UniIR's `format_string`, applied to query text and candidate text alike.

    Source: TIGER-AI-Lab/UniIR, src/data/preprocessing/utils.py `format_string` (commit 669475c),
    called in src/data/mbeir_dataset.py on `query_txt`, on every candidate `txt` (positives,
    negatives, the pool dataset) and on the instruction-prefixed query. In order: drop every CR
    (so CRLF becomes LF), strip surrounding whitespace, strip surrounding double quotes (all of
    them, as `str.strip('"')` does, with no second whitespace strip), upper-case the first
    character, and add a final "." unless the text ends in ".", "?" or "!". None gives "".
    """
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        if s[-1] not in ".?!":
            s += "."
    return s


def apply_text_rule(txt: Any, rule: str = "uniir") -> str | None:
    """Model text of a record's text field under `rule` (TEXT_RULES); None when there is no text.

    "uniir" is `normalize_text`; "none" passes the text through unchanged. A text that the rule
    empties (only quotes, say) counts as no text, the same test `present` applies to the raw field.
    """
    if rule not in TEXT_RULES:
        raise ValueError(f"unknown text rule {rule!r} (expected one of {', '.join(TEXT_RULES)})")
    if not present(txt):
        return None
    out = normalize_text(txt) if rule == "uniir" else txt
    return out if out.strip() else None


def query_item(
    row: Mapping[str, Any],
    instructions: Instructions,
    rng: random.Random | None = None,
    prompt_index: int | None = None,
    text_rule: str = "uniir",
) -> dict[str, Any]:
    """Query row -> model item {text under `text_rule`, image path, instruction}.

    The instruction is the tsv prompt as written: U-MARVEL keeps it apart from the query text
    (wrapped in its own markers and left out of the pooled span), so UniIR's formatting of the
    concatenated "<prompt> <query>" string has no counterpart here.
    """
    ds, _ = split_id(row["qid"])
    qm = row["query_modality"]
    cm = task_modalities(row["task_id"])[1]
    return {
        "text": apply_text_rule(row.get("query_txt"), text_rule),
        "image": row.get("query_img_path") or None,
        "instruction": instructions.get(ds, qm, cm, rng=rng, prompt_index=prompt_index),
    }


def candidate_item(row: Mapping[str, Any], text_rule: str = "uniir") -> dict[str, Any]:
    """Candidate row -> model item; no instruction, text under the same `text_rule` as queries."""
    return {
        "text": apply_text_rule(row.get("txt"), text_rule),
        "image": row.get("img_path") or None,
        "instruction": None,
    }
