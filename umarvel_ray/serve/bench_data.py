"""What the serving bench serves and sends: the tiny model, a toy pool embedded and indexed by the
library, and pre-serialised request bodies with the pool's modality mix (query images as the toy
PNGs or as realistic JPEGs).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
TOY_PRESET = dict(test_queries=8, test_pool=60, test_distractors=2, train_queries=4, train_distractors=1,
                  nli_pairs=10, caption_pairs=10)  # fmt: skip


def build_pool(work: Path, pool_rows: int, seed: int) -> dict[str, Any]:
    """Tiny model + toy benchmark + an embedded and indexed pool, all written by the library."""
    from umarvel_ray.data import mbeir, model_items
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.toy.builder import Preset, make_toy_mbeir
    from umarvel_ray.index import build_index
    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.model.tiny import make_tiny_qwen2vl
    from umarvel_ray.store import shard_name, write_manifest, write_shard

    model_dir = make_tiny_qwen2vl(work / "tiny_model", seed=seed)
    data_root = make_toy_mbeir(work / "toy", size="small", seed=seed, preset=Preset(**TOY_PRESET))
    lines = [ln for ln in (data_root / mbeir.GLOBAL_POOL_FILE).read_text().splitlines() if ln.strip()]
    random.Random(seed).shuffle(lines)  # the union pool is grouped by dataset: mix the modalities
    lines = lines[:pool_rows]
    pool = work / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n")
    rows = mbeir.read_pool(pool).to_pylist()
    emb = Embedder.load(model_dir)
    px = (emb.cfg.inputs.min_pixels, emb.cfg.inputs.max_pixels)
    items = []
    for r in rows:
        it = model_items.candidate_item(r)
        if it["image"]:
            it["image"] = load_image(data_root, it["image"], min_pixels=px[0], max_pixels=px[1])
        items.append(it)
    vecs = emb.encode_candidates(items)
    ids = [r["did"] for r in rows]
    emb_dir = work / "embeddings"
    write_shard(emb_dir / shard_name(0), ids, [r["modality"] for r in rows], vecs)
    write_manifest(
        emb_dir,
        {
            "input": str(pool),
            "dim": int(vecs.shape[1]),
            "settings": {"input": str(pool), "data_root": str(data_root), "text_rule": "uniir"},
            "complete": True,
        },
    )
    index_dir = work / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    build_index(vecs, ids).save(index_dir / "pool")
    return {"model_dir": model_dir, "data_root": data_root, "rows": rows, "embeddings_dir": emb_dir,
            "index_dir": index_dir}  # fmt: skip


def realistic_jpeg(src: Path, size: tuple[int, int], seed: int) -> bytes:
    """The toy image upscaled to `size` (W, H) with film-grain noise, as a quality-90 JPEG: what a
    client sends for a real photo (M-BEIR's are ~256-500 px JPEGs), not an 84x84 PNG."""
    import io

    from PIL import Image

    img = Image.open(src).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 10, (size[1], size[0], 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def request_bodies(
    rows: list[dict[str, Any]], data_root: Path, image_size: tuple[int, int] | None = None
) -> dict[str, list[bytes]]:
    """Pre-serialised request bodies per route: each pool row's text and/or image (a base64 data
    URI: the toy PNG, or with `image_size` a realistic JPEG of that size) as one query item, so
    the load has the pool's modality mix."""
    import base64

    items = []
    for k, r in enumerate(rows):
        it: dict[str, Any] = {}
        if r.get("txt"):
            it["text"] = r["txt"]
        if r.get("img_path"):
            src = data_root / r["img_path"]
            if image_size:
                data, mime = realistic_jpeg(src, image_size, seed=k), "image/jpeg"
            else:
                data, mime = src.read_bytes(), IMAGE_MIME[src.suffix.lower()]
            it["image"] = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        if it:
            items.append(it)
    return {
        "/v1/embed": [json.dumps({"items": [it], "role": "query"}).encode() for it in items],
        "/v1/search": [json.dumps({"query": it, "k": 10}).encode() for it in items],
    }


def modality_mix(rows: list[dict[str, Any]]) -> dict[str, int]:
    mix: dict[str, int] = {}
    for r in rows:
        mix[r["modality"]] = mix.get(r["modality"], 0) + 1
    return dict(sorted(mix.items()))
