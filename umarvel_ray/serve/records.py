"""The id -> record store the ingress answers from, built from what the batch jobs wrote.

The pool jsonl (text, image path, modality) plus `data_root` for images; the embedding manifest
names both, so serving a pool needs only its embedding directory and index. Images are read only
from `data_root` by a pool record's own path, never from a path a client sent.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from umarvel_ray.data.images import load_image
from umarvel_ray.data.mbeir import read_pool
from umarvel_ray.data.model_items import apply_text_rule

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class RecordStore:
    """Pool records by id, with a small cache of decoded candidate images for reranking."""

    def __init__(self, pool: Path, data_root: Path, text_rule: str = "uniir", cache_size: int = 512):
        table = read_pool(pool)
        self.rows: dict[str, dict[str, Any]] = {r["did"]: r for r in table.to_pylist()}
        self.data_root = data_root.resolve()
        self.text_rule = text_rule
        self._cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, rid: str) -> bool:
        return rid in self.rows

    def get(self, rid: str) -> dict[str, Any] | None:
        return self.rows.get(rid)

    def public(self, rid: str, prefix: str = "") -> dict[str, Any]:
        """The JSON a client sees: id, text, modality and where its image is served."""
        row = self.rows[rid]
        return {
            "id": rid,
            "text": row.get("txt") or None,
            "modality": row.get("modality"),
            "image_url": f"{prefix}/v1/records/{rid}/image" if row.get("img_path") else None,
        }

    def image_path(self, rid: str) -> Path | None:
        """The record's image file, refused if its path leaves data_root."""
        rel = self.rows[rid].get("img_path")
        if not rel:
            return None
        path = (self.data_root / rel).resolve()
        if not path.is_relative_to(self.data_root):
            raise ValueError(f"record {rid}: img_path leaves data_root")
        return path

    def image_bytes(self, rid: str) -> tuple[bytes, str]:
        """Raw file bytes and their MIME type (sniffed from the header, not the file name)."""
        path = self.image_path(rid)
        if path is None:
            raise FileNotFoundError(f"record {rid} has no image")
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            mime = MIME.get(im.format or "", "application/octet-stream")
        return data, mime

    def model_item(self, rid: str, pixels: tuple[int, int]) -> dict[str, Any]:
        """The candidate item exactly as the embedding job builds it (text rule, decoded image)."""
        row = self.rows[rid]
        image = None
        if row.get("img_path"):
            key = (rid, pixels[0], pixels[1])
            image = self._cache.get(key)
            if image is None:
                image = load_image(self.data_root, row["img_path"], min_pixels=pixels[0], max_pixels=pixels[1])
                self._cache[key] = image
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return {"text": apply_text_rule(row.get("txt"), self.text_rule), "image": image, "instruction": None}
