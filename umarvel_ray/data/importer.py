"""Build an M-BEIR-layout directory from what users have: images + captions.

Sources (`ImportConfig.format`):
* `table`: a captions table (csv, jsonl or parquet) with an image path column and a caption
  column, optional split and item id columns; image paths resolve under `images`.
* `coco`: a COCO-style caption json ({"images": [{id, file_name}], "annotations": [{image_id,
  caption}]}); file names resolve under `images`; the image id is the item; an annotation may
  carry a `split`.
* `hf`: a Hugging Face `datasets` dataset saved with `save_to_disk` (an image column: `Image`
  feature, bytes or path; a text column holding a string or a list of strings); a DatasetDict's
  `train` / `test` parts are those splits; only when `datasets` is installed.

What is written (the M-BEIR formats of `data.mbeir`, dataset id `dataset_id`, name `name`):
task 0 text->image (each distinct caption is a query; every image of every item with that caption
is a positive, so a caption shared by two items has several positives), task 3 image->text (each
image; its captions are the positives), and task 4 image->image where an item has several images
(each image; the item's other images are positives). Items go to train or test by the split
column, else by a seeded hash of the item id (`test_fraction`), so an item never has images on
both sides. Per split and task: query jsonl and qrels; test pools are the task's local pools
(`cand_pool/local/mbeir_<name>_task<N>_cand_pool.jsonl`), train pools sit beside them as
`..._train_cand_pool.jsonl`; no union files (the jobs build unions from these, `data.tasks`).
Images are copied under `mbeir_images/<name>/`, and `instructions/query_instructions.tsv` gets
one editable row per task.

Rows (one per caption: a COCO annotation, a table row, each caption of an HF record): every
input row is either written or rejected with its location (FILE:LINE; `FILE:annotations[i]`,
`DIR:<part>[i]`) and reason (missing or undecodable image, unknown COCO image id, empty caption,
unknown split); `rows_in = rows_out + rows_rejected` is reported. `missing_images=error` stops
at the first bad image instead. The output is then checked by
`validate.validate_dir(check_images=True)`: a directory this writes always validates.
The three readers are `data.import_sources`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, require_absolute
from umarvel_ray.data import catalogue, instructions, mbeir, writers
from umarvel_ray.data.import_config import FORMATS, ImportConfig
from umarvel_ray.data.import_sources import (
    SPLITS,
    Row,
    image_suffix,
    read_coco,
    read_hf,
    read_table,
    source_format,
)

log = logging.getLogger(__name__)

REPORT_FILE = "import_report.json"
IMAGE_DIR = "mbeir_images"
DEFAULT_PROMPTS = {
    0: ("Find an image that matches the given caption.", "Retrieve the image described by this text."),
    3: ("Find a caption that describes the given image.", "Retrieve the text that describes this image."),
    4: ("Find another image of the same item as the given image.", "Retrieve a matching image of this item."),
}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass
class ImportResult:
    """Counts of the import and where it went (the json report)."""

    out_dir: Path
    rows_in: int = 0
    rows_out: int = 0
    rejected: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return len(self.rejected)


# ----------------------------------------------------------------------------------------------
# Building the layout
# ----------------------------------------------------------------------------------------------


def hashed_split(item: str, seed: int, test_fraction: float) -> str:
    """train/test of an item from sha1(seed, item): stable across runs, machines and row order."""
    h = int.from_bytes(hashlib.sha1(f"{seed}\x1f{item}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def _check_image(row: Row) -> str | None:
    """Why the row's image cannot be used (the embedding pipeline's decoder decides), or None."""
    from umarvel_ray.data.images import ImageDecodeError, decode_image, load_image

    if row.why is not None:
        return row.why
    try:
        if isinstance(row.image, bytes):
            decode_image(row.image)
        elif row.image is None:
            return "no image"
        else:
            load_image(row.image.parent, row.image.name)
    except ImageDecodeError as e:
        return e.reason
    return None


def check_config(cfg: ImportConfig) -> None:
    """Reject a config that cannot work before anything is read or written."""
    for k in ("out_dir", "source"):
        if not getattr(cfg, k):
            raise ConfigError(f"{k} is required (set {k}=...)")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    if not _NAME_RE.fullmatch(cfg.name) or cfg.name == "union":
        raise ConfigError(f"name must be lower-case letters, digits, _ or - (not 'union'), got {cfg.name!r}")
    if cfg.name in {t.dataset.lower() for t in catalogue.MBEIR_TASKS}:
        raise ConfigError(f"name {cfg.name!r} is an M-BEIR dataset; pick another")
    if not 0 <= cfg.dataset_id < 2**31 or not 0.0 < cfg.test_fraction < 1.0:
        raise ConfigError("dataset_id must be >= 0 and test_fraction in (0, 1)")
    bad = [t for t in cfg.tasks if t not in DEFAULT_PROMPTS]
    if bad or not cfg.tasks:
        raise ConfigError(f"tasks must be a non-empty subset of {sorted(DEFAULT_PROMPTS)}, got {cfg.tasks}")
    if cfg.missing_images not in ("skip", "error"):
        raise ConfigError(f"missing_images must be skip or error, got {cfg.missing_images!r}")
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out_dir {out} is not empty (set overwrite=true to replace it)")


@dataclass
class _Split:
    images: dict[str, str] = field(default_factory=dict)  # image key -> did
    image_item: dict[str, str] = field(default_factory=dict)  # image did -> item
    image_caps: dict[str, list[str]] = field(default_factory=dict)  # image did -> caption dids
    caption_images: dict[str, list[str]] = field(default_factory=dict)  # caption did -> image dids


def run_import(cfg: ImportConfig) -> ImportResult:
    """Read the source, write the layout, validate it; returns the counts (also in import_report.json)."""
    require_absolute(cfg)
    check_config(cfg)
    src, out = Path(cfg.source), Path(cfg.out_dir)
    images = Path(cfg.images) if cfg.images else src.parent
    if not src.exists():
        raise ConfigError(f"source not found: {src}")
    fmt = source_format(cfg, src)
    rows = read_hf(cfg, src, images) if fmt == "hf" else read_coco(cfg, src, images) if fmt == "coco" else read_table(cfg, src, images)
    if out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    res = ImportResult(out)
    ds = cfg.dataset_id
    next_id = iter(range(mbeir.DID_STRIDE))
    records: dict[str, dict[str, Any]] = {}  # did -> pool record
    caption_did: dict[tuple[str, str], str] = {}  # (split, normalised caption) -> did
    item_split: dict[str, str] = {}
    image_bad: dict[str, str] = {}
    splits = {s: _Split() for s in SPLITS}
    img_dir = out / IMAGE_DIR / cfg.name
    for row in rows:
        res.rows_in += 1
        split = row.split or item_split.get(row.item) or hashed_split(row.item, cfg.seed, cfg.test_fraction)
        why = None
        if split not in SPLITS:
            why = f"split {row.split!r} is not one of {SPLITS}"
        elif item_split.setdefault(row.item, split) != split:
            why = f"item {row.item!r} is in {item_split[row.item]} and {split}: one item, one split"
        elif not row.caption:
            why = "empty caption"
        elif row.image_key in image_bad:
            why = image_bad[row.image_key]
        elif row.image_key not in splits[split].images:
            why = _check_image(row)
            if why is not None:
                image_bad[row.image_key] = why
        if why is not None:
            if cfg.missing_images == "error" and row.image_key in image_bad:
                _stop(row, "image_id" if fmt == "coco" else cfg.image_column, why)
            res.rejected.append(f"{row.where}: {why}")
            continue
        sp = splits[split]
        img_did = sp.images.get(row.image_key)
        if img_did is None:
            img_did = f"{ds}:{next(next_id)}"
            suffix = image_suffix(row.image) if isinstance(row.image, bytes) else Path(row.image_key).suffix.lower()
            rel = f"{IMAGE_DIR}/{cfg.name}/{img_did.split(':')[1].zfill(7)}{suffix or '.img'}"
            img_dir.mkdir(parents=True, exist_ok=True)
            if isinstance(row.image, bytes):
                (out / rel).write_bytes(row.image)
            else:
                shutil.copyfile(row.image, out / rel)  # type: ignore[arg-type]
            sp.images[row.image_key] = img_did
            sp.image_item[img_did] = row.item
            records[img_did] = {"did": img_did, "txt": None, "img_path": rel, "modality": "image", "src_content": None}
        key = (split, " ".join(row.caption.split()))
        cap_did = caption_did.get(key)
        if cap_did is None:
            cap_did = caption_did[key] = f"{ds}:{next(next_id)}"
            records[cap_did] = {"did": cap_did, "txt": row.caption, "img_path": None, "modality": "text", "src_content": None}
        if cap_did not in sp.image_caps.setdefault(img_did, []):
            sp.image_caps[img_did].append(cap_did)
        if img_did not in sp.caption_images.setdefault(cap_did, []):
            sp.caption_images[cap_did].append(img_did)
        res.rows_out += 1
    if res.rows_out == 0:
        raise ConfigError(f"no usable rows in {src} ({res.rows_in} read, all rejected): " + "; ".join(res.rejected[:5]))
    _write_layout(cfg, out, splits, records, res)
    _finish(cfg, out, res)
    return res


def _stop(row: Row, field_name: str, why: str) -> None:
    """missing_images=error: raise at the row, FILE:LINE where the source has lines (csv, jsonl),
    else the row's own location (`annotations[7]`, `train[3]`, `row 5`)."""
    file, _, loc = row.where.rpartition(":")
    if loc.isdigit():
        raise mbeir.MBEIRFormatError(file, int(loc), field_name, why)
    raise ValueError(f"{row.where}: field '{field_name}': {why}")


def _write_layout(
    cfg: ImportConfig, out: Path, splits: dict[str, _Split], records: dict[str, dict[str, Any]], res: ImportResult
) -> None:
    from umarvel_ray.data.tasks import task_paths

    ds, qn = cfg.dataset_id, iter(range(mbeir.QID_STRIDE))
    written_tasks: list[int] = []
    for split, sp in splits.items():
        by_item: dict[str, list[str]] = {}
        for img, item in sp.image_item.items():
            by_item.setdefault(item, []).append(img)
        built: dict[int, tuple[list[dict[str, Any]], list[str]]] = {}
        if 0 in cfg.tasks:
            qs = [
                _query(ds, next(qn), records[c]["txt"], None, "text", imgs, 0)
                for c, imgs in sp.caption_images.items()
            ]
            built[0] = (qs, list(sp.image_item))
        if 3 in cfg.tasks:
            qs = [
                _query(ds, next(qn), None, records[i]["img_path"], "image", caps, 3)
                for i, caps in sp.image_caps.items()
            ]
            built[3] = (qs, list(sp.caption_images))
        if 4 in cfg.tasks:
            qs = [
                _query(ds, next(qn), None, records[i]["img_path"], "image", [o for o in imgs if o != i], 4)
                for imgs in by_item.values()
                if len(imgs) > 1
                for i in imgs
            ]
            if qs:
                built[4] = (qs, list(sp.image_item))
        counts = {}
        for t, (qs, pool) in built.items():
            if not qs:
                continue
            qf, pf, rf = task_paths(cfg.name, t, split)
            res.files[qf] = writers.write_queries(out / qf, qs)
            res.files[pf] = writers.write_pool(out / pf, [records[d] for d in pool])
            res.files[rf] = writers.write_qrels(out / rf, writers.qrels_from_queries(qs))
            counts[f"task{t}"] = len(qs)
            if t not in written_tasks:
                written_tasks.append(t)
        res.splits[split] = counts
    rows = [
        instructions.InstructionRow(*catalogue.task_modalities(t), cfg.name, ds, DEFAULT_PROMPTS[t]) for t in sorted(written_tasks)
    ]
    res.files[mbeir.INSTRUCTIONS_FILE] = instructions.write_instructions(out / mbeir.INSTRUCTIONS_FILE, rows)


def _query(ds: int, n: int, txt: str | None, img: str | None, modality: str, pos: list[str], task: int) -> dict[str, Any]:
    return {
        "qid": f"{ds}:{n}",
        "query_txt": txt,
        "query_img_path": img,
        "query_modality": modality,
        "query_src_content": None,
        "pos_cand_list": list(pos),
        "neg_cand_list": [],
        "task_id": task,
    }


def _finish(cfg: ImportConfig, out: Path, res: ImportResult) -> None:
    """Validate the written directory and write import_report.json; a validation error raises."""
    from umarvel_ray.data.validate import validate_dir

    report = validate_dir(out, check_images=True)
    (out / REPORT_FILE).write_text(
        json.dumps(
            {
                "source": cfg.source,
                "rows_in": res.rows_in,
                "rows_out": res.rows_out,
                "rows_rejected": res.rows_rejected,
                "rejected": res.rejected,
                "queries": res.splits,
                "files": res.files,
                "validation_errors": report.errors,
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    if not report.ok:
        raise RuntimeError(f"the imported directory does not validate:\n{report.format(max_errors=20)}")


__all__ = ["ImportConfig", "ImportResult", "hashed_split", "run_import"]
