"""The CPU side of the embedding pipeline: deterministic input shards and the parse/decode stage.

An input jsonl file is split into *shards* of `shard_rows` consecutive physical lines (shard k holds
lines k*shard_rows+1 .. (k+1)*shard_rows) and every shard into *chunks* of at most `chunk_rows`
lines, each described by its byte range. The driver scans the file once (`index_input`: byte
offsets, non-blank rows per shard, and a content hash used to recognise the same input on a
restart); Ray tasks then read only their own byte range, so nothing but chunk descriptors travels
from the driver.

`decode_chunks` is the Ray Data CPU stage (a plain function, `map_batches(batch_size=1)` over chunk
descriptors): it parses each line, builds the model item with the data layer (`candidate_item` /
`query_item`), decodes and resizes its image under the model's pixel budget, and packs the valid
rows into *groups* of at most `batch_size` rows, one model batch each. Two payloads, chosen by
`collate`:

* collate=True (default): the group is run through the embedder's own `Collator` (tokenizer +
  image patchify, no weights) in the task, so all CPU preprocessing runs in parallel tasks and
  the model actor only runs the forward pass. The payload is the collated arrays: token ids,
  masks, M-RoPE positions and the images as uint8 patches at model resolution (`model.pixels`:
  the size of the resized uint8 image, never the full-size source; the float `pixel_values`,
  8x larger, are built on the actor's device).
* collate=False: the payload is the items with their resized uint8 HxWx3 arrays (the most compact
  exact form, a lossy re-encode would change embeddings) and the actor collates.

Bad rows are never raised: each becomes a reject (field, reason) that travels with its group's
metadata, so the driver can account for every input row.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.data.rows import (  # noqa: F401 - KINDS, query_rng: re-exported for embed.config and tests
    FIELDS,
    KINDS,
    RowReject,
    parse_row,
    query_rng,
)
from umarvel_ray.store import shard_name


@dataclass(frozen=True)
class Chunk:
    """A byte range [start, end) of the input holding whole lines, starting at line `first_line`."""

    shard: int
    first_line: int
    start: int
    end: int


@dataclass
class ShardSpec:
    """One output shard: its input lines and the number of non-blank rows in them."""

    index: int
    first_line: int
    last_line: int
    rows_in: int
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class InputIndex:
    """The deterministic shard layout of one input file."""

    path: Path
    sha256: str
    size: int
    lines: int
    shard_rows: int
    shards: list[ShardSpec]

    @property
    def rows_in(self) -> int:
        return sum(s.rows_in for s in self.shards)


def index_input(path: str | Path, shard_rows: int, chunk_rows: int) -> InputIndex:
    """Scan a jsonl file once: shard/chunk byte ranges, non-blank rows per shard, sha256.

    Lines are split by the one line reader (`data.jsonl`: LF, CRLF and CR end a line, a leading
    BOM is dropped). Blank lines are not rows: they are skipped, not rejected, but they still
    count as lines so that line numbers match the file.
    """
    from umarvel_ray.data.jsonl import iter_lines

    if shard_rows < 1 or chunk_rows < 1:
        raise ValueError("shard_rows and chunk_rows must be >= 1")
    chunk_rows = min(chunk_rows, shard_rows)
    path = Path(path)
    digest = hashlib.sha256()
    shards: list[ShardSpec] = []
    offset = 0
    line_no = 0
    chunk_start = chunk_first = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        f.seek(0)
        for line in iter_lines(f):
            line_no = line.number
            pos_in_shard = (line_no - 1) % shard_rows
            if pos_in_shard == 0:
                shards.append(ShardSpec(len(shards), line_no, line_no, 0))
            shard = shards[-1]
            if pos_in_shard % chunk_rows == 0:
                chunk_start, chunk_first = offset, line_no
            offset = line.end
            shard.last_line = line_no
            if not line.blank:
                shard.rows_in += 1
            end_of_chunk = (pos_in_shard + 1) % chunk_rows == 0 or pos_in_shard + 1 == shard_rows
            if end_of_chunk:
                shard.chunks.append(Chunk(shard.index, chunk_first, chunk_start, offset))
    if shards and (not shards[-1].chunks or shards[-1].chunks[-1].end != offset):
        shards[-1].chunks.append(Chunk(shards[-1].index, chunk_first, chunk_start, offset))
    return InputIndex(path, digest.hexdigest(), offset, line_no, shard_rows, shards)


def chunk_records(shards: list[ShardSpec]) -> list[dict[str, int]]:
    """Chunk descriptors of `shards` as plain dicts (the input rows of the Ray dataset)."""
    return [
        {"shard": c.shard, "first_line": c.first_line, "start": c.start, "end": c.end}
        for s in shards
        for c in s.chunks
    ]


# ---------------------------------------------------------------------------------------------
# Collator without weights (for collating in CPU tasks)
# ---------------------------------------------------------------------------------------------


def load_collator(model: str, adapter: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """The embedder's `Collator` (tokenizer + image processor, added tokens) without its weights."""
    from umarvel_ray.model.backbone import load_processor
    from umarvel_ray.model.embedder import saved_embedder_config
    from umarvel_ray.model.inputs import Collator, ensure_added_tokens

    cfg = saved_embedder_config(model, adapter, overrides)
    processor = load_processor(cfg.model)
    ensure_added_tokens(processor.tokenizer)
    return Collator(
        processor.tokenizer,
        processor.image_processor,
        cfg.inputs,
        pool_instruction=cfg.pool_instruction,
        chat_template=getattr(processor, "chat_template", None),
    )


@lru_cache(maxsize=2)
def _cached_collator(model: str, adapter: str | None, overrides_json: str) -> Any:
    return load_collator(model, adapter, json.loads(overrides_json) or None)


# ---------------------------------------------------------------------------------------------
# The CPU stage
# ---------------------------------------------------------------------------------------------

@dataclass
class ParsedRow:
    """One non-blank input line after parsing: an item to embed, or a reject."""

    shard: int
    line: int
    id: str
    modality: str
    item: dict[str, Any] | None
    reject: tuple[str, str] | None = None


def iter_chunk(
    f: Any, chunk: dict[str, int], kind: str, data_root: str, row_kwargs: dict[str, Any]
) -> Iterator[ParsedRow]:
    """Parse the lines of one chunk (an open binary file and a chunk descriptor)."""
    import io

    from umarvel_ray.data.jsonl import iter_lines

    start = int(chunk["start"])
    f.seek(start)
    data = io.BytesIO(f.read(int(chunk["end"]) - start))
    for ln in iter_lines(data, offset=start, first_line=int(chunk["first_line"])):
        if ln.blank:
            continue
        try:
            rid, item, modality = parse_row(ln.content, kind, data_root, **row_kwargs)
            yield ParsedRow(int(chunk["shard"]), ln.number, rid, modality, item)
        except RowReject as exc:
            yield ParsedRow(
                int(chunk["shard"]), ln.number, _best_effort_id(ln.content, kind), "", None, (exc.field, exc.reason)
            )


def _best_effort_id(raw: bytes, kind: str) -> str:
    """The row's id for a reject record, when the line parses far enough to have one."""
    from umarvel_ray.data.jsonl import parse_json

    obj, _ = parse_json(raw)
    rid = obj.get(FIELDS[kind][0]) if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else ""


def _collate_isolating(collator: Any, rows: list[ParsedRow], is_query: bool) -> tuple[Any, list[ParsedRow]]:
    """Collate the items of `rows`; rows whose item alone fails to collate become rejects."""
    try:
        return collator([r.item for r in rows], is_query=is_query), rows
    except Exception:  # noqa: BLE001 - find the bad rows below
        good = []
        for r in rows:
            try:
                collator([r.item], is_query=is_query)
                good.append(r)
            except Exception as exc:  # noqa: BLE001
                r.item, r.reject = (
                    None,
                    ("<model input>", f"cannot build model input: {type(exc).__name__}: {exc}"),
                )
        if not good:
            return None, []
        return collator([r.item for r in good], is_query=is_query), good


def pack_group(rows: list[ParsedRow], payload: Any) -> dict[str, Any]:
    """One output row of the CPU stage: the rows' meta plus the model input of the valid ones."""
    meta = {
        "shard": np.array([r.shard for r in rows], np.int32),
        "line": np.array([r.line for r in rows], np.int64),
        "id": np.array([r.id for r in rows], object),
        "modality": np.array([r.modality for r in rows], object),
        "reject_field": np.array([r.reject[0] if r.reject else "" for r in rows], object),
        "reject_reason": np.array([r.reject[1] if r.reject else "" for r in rows], object),
    }
    return {
        "meta": pickle.dumps(meta, protocol=5),
        "n_rows": len(rows),
        # b"" rather than None: an all-null column becomes Arrow's null type and comes back garbled.
        "payload": b"" if payload is None else pickle.dumps(payload, protocol=5),
    }


def unpack_group(row_meta: bytes, row_payload: bytes) -> tuple[dict[str, np.ndarray], Any]:
    """Inverse of `pack_group`: (meta columns, payload or None)."""
    return pickle.loads(row_meta), pickle.loads(row_payload) if row_payload else None


def decode_chunks(
    batch: dict[str, np.ndarray],
    *,
    input_path: str,
    kind: str,
    data_root: str,
    batch_size: int,
    collate: bool,
    model: str,
    adapter: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    instructions_path: str | None = None,
    prompt_index: int | None = None,
    seed: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 300 * 28 * 28,
    text_rule: str = "uniir",
) -> dict[str, np.ndarray]:
    """Ray Data CPU stage: chunk descriptors -> *groups*, each one model batch for the actors.

    A group holds up to `batch_size` valid rows of one chunk (rejected rows ride along in a group
    of their own). Its payload is the model input of the valid rows: with `collate=True` the
    embedder's collated batch (numpy arrays of token ids, masks, positions, pixel patches), else
    the items with their resized uint8 images for the actor to collate.
    """
    row_kwargs = dict(
        instructions_path=instructions_path,
        prompt_index=prompt_index,
        seed=seed,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        text_rule=text_rule,
    )
    collator = (
        _cached_collator(model, adapter, json.dumps(model_overrides or {}, sort_keys=True))
        if collate
        else None
    )
    is_query = kind == "query"
    out: list[dict[str, Any]] = []
    with open(input_path, "rb") as f:
        for k in range(len(batch["shard"])):
            chunk = {c: int(batch[c][k]) for c in ("shard", "first_line", "start", "end")}
            rejected: list[ParsedRow] = []
            valid: list[ParsedRow] = []
            for r in iter_chunk(f, chunk, kind, data_root, row_kwargs):
                (rejected if r.reject else valid).append(r)
            for i in range(0, len(valid), batch_size):
                rows = valid[i : i + batch_size]
                if collator is not None:
                    collated, good = _collate_isolating(collator, rows, is_query)
                    rejected += [r for r in rows if r.reject]
                    if good:
                        arrays = {key: v.numpy() for key, v in collated.items() if hasattr(v, "numpy")}
                        out.append(pack_group(good, {"collated": arrays}))
                else:
                    out.append(pack_group(rows, {"items": [r.item for r in rows]}))
            if rejected:
                out.append(pack_group(rejected, None))
    result = {
        "meta": np.array([g["meta"] for g in out], dtype=object),
        "n_rows": np.array([g["n_rows"] for g in out], dtype=np.int64),
        "payload": np.array([g["payload"] for g in out], dtype=object),
    }
    return result
