"""The importer's sources read into `Row`s: a captions table, a COCO caption json, a saved HF dataset.

Each reader yields one `Row` per caption with its location (`FILE:LINE`, `FILE:annotations[i]`,
`DIR:<part>[i]`) so that `importer.run_import` can write or reject every input row by where it came
from; the readers only read and normalise (the importer decides what is usable). `source_format`
picks the reader when `ImportConfig.format` is `auto`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError
from umarvel_ray.data import jsonl, mbeir
from umarvel_ray.data.import_config import ImportConfig

SPLITS = ("train", "test")


@dataclass
class Row:
    """One input record, normalised: where it came from, its item, image and caption."""

    where: str  # FILE:LINE (or FILE:row N)
    item: str
    image: Path | bytes | None  # bytes: an image held in the dataset itself (HF)
    image_key: str
    caption: str | None
    split: str | None
    why: str | None = None  # the reader already knows the image is unusable (e.g. an unknown image id)



def _cell(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _table_rows(cfg: ImportConfig, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                yield f"{path}:{reader.line_num}", rec
    elif suffix in (".jsonl", ".json"):
        for n, obj, err in jsonl.iter_jsonl(path):
            if err is not None or not isinstance(obj, dict):
                raise mbeir.MBEIRFormatError(path, n, "<json>", err or "expected a json object")
            yield f"{path}:{n}", obj
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {i}", rec
    else:
        raise ConfigError(f"captions table must be .csv, .tsv, .jsonl or .parquet, got {path}")


def read_table(cfg: ImportConfig, path: Path, images: Path) -> Iterator[Row]:
    """Rows of a captions table; columns by the config's names (image and caption required)."""
    first = True
    for where, rec in _table_rows(cfg, path):
        if first:
            missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in rec]
            if missing:
                raise ConfigError(f"{where}: columns {missing} not in the table (has {sorted(rec)})")
            first = False
        img = _cell(rec.get(cfg.image_column))
        item = _cell(rec.get(cfg.id_column)) or img or where
        p = None if img is None else (Path(img) if Path(img).is_absolute() else images / img)
        yield Row(where, item, p, img or "", _cell(rec.get(cfg.caption_column)), _cell(rec.get(cfg.split_column)))


def read_coco(cfg: ImportConfig, path: Path, images: Path) -> Iterator[Row]:
    """One row per COCO caption annotation; the image id is the item."""
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ConfigError(f"{path}: not a COCO caption file (needs 'images' and 'annotations')")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}]"
        image_id = ann.get("image_id")
        fname = files.get(image_id)
        yield Row(
            where,
            str(image_id),
            None if fname is None else images / fname,
            fname or f"<image_id {image_id!r}>",
            _cell(ann.get("caption")),
            _cell(ann.get("split")),
            None if fname is not None else f"image_id {image_id!r} is not in the file's 'images'",
        )


def read_hf(cfg: ImportConfig, path: Path, images: Path) -> Iterator[Row]:
    """Rows of a `datasets` dataset saved to disk, one per caption (a list column gives several).

    Splits: a DatasetDict's `train` / `test` parts are those splits (unless a split column says
    otherwise); other parts (`validation`, ...) and a plain Dataset go by the split column, else the
    hashed split. The image column may be an `Image` feature (read undecoded: the original bytes
    are copied and a broken image is one rejected row, not a crash), bytes, or a path (relative to
    `images`). A record with no caption is one rejected row.
    """
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "format=hf needs the `datasets` package (pip install datasets); or export the dataset to a "
            "captions table (csv/jsonl/parquet) with an image folder and use format=table"
        ) from None
    ds = datasets.load_from_disk(str(path))
    parts = list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, d in parts:
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in d.column_names]
        if missing:
            raise ConfigError(
                f"{path}{f' ({split})' if split else ''}: columns {missing} not in the dataset "
                f"(has {d.column_names}); set image_column= / caption_column="
            )
        if isinstance(d.features[cfg.image_column], datasets.Image):
            d = d.cast_column(cfg.image_column, datasets.Image(decode=False))
        part = split or "data"
        for i, rec in enumerate(d):
            where = f"{path}:{part}[{i}]"
            image, key, why = _hf_image(rec.get(cfg.image_column), images, f"{part}[{i}]")
            item = _cell(rec.get(cfg.id_column)) or f"{part}[{i}]"
            split_v = _cell(rec.get(cfg.split_column)) or (split if split in SPLITS else None)
            caps = rec.get(cfg.caption_column)
            caps = [c for c in caps if _cell(c)] if isinstance(caps, list) else [caps]
            for c in caps or [None]:
                yield Row(where, item, image, key, _cell(c), split_v, why)


def _hf_image(v: Any, images: Path, key: str) -> tuple[Path | bytes | None, str, str | None]:
    """(image, image key, why unusable) of one HF image cell: {bytes, path} (an undecoded Image
    feature), raw bytes, or a path string."""
    if isinstance(v, dict):
        if v.get("bytes"):
            return bytes(v["bytes"]), key, None
        v = v.get("path")
    if isinstance(v, (bytes, bytearray)):
        return (bytes(v), key, None) if v else (None, key, "no image")
    if isinstance(v, str) and v.strip():
        p = Path(v) if Path(v).is_absolute() else images / v
        return p, str(p), None
    return None, key, "no image"


def image_suffix(data: bytes) -> str:
    """File suffix of image bytes from their header (the copy keeps the original encoding)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except (UnidentifiedImageError, OSError, ValueError):
        return ".img"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else ".img")


def source_format(cfg: ImportConfig, src: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    if src.is_dir():
        return "hf"
    if src.suffix.lower() == ".json":
        try:
            head = json.loads(src.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "table"
        return "coco" if isinstance(head, dict) and "annotations" in head else "table"
    return "table"
