"""A fixed probe set (toy queries with instructions, candidates with images) and its embeddings:
how training tests compare merged models by what they compute rather than by their weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def probe_items(data: Path) -> tuple[list[dict], list[dict]]:
    """Eight toy queries (with instructions) and eight candidates, images decoded."""
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.instructions import read_instructions
    from umarvel_ray.data.model_items import candidate_item, query_item

    def rows(rel: str) -> list[dict]:
        return [json.loads(x) for x in (data / rel).read_text().splitlines()[:8]]

    instr = read_instructions(data / "instructions/query_instructions.tsv")
    queries = [query_item(r, instr, prompt_index=0) for r in rows("query/train/mbeir_union_up_train.jsonl")]
    cands = [candidate_item(r) for r in rows("cand_pool/global/mbeir_union_train_cand_pool.jsonl")]

    def dec(item: dict) -> dict:
        return {**item, "image": load_image(data, item["image"]) if item["image"] else None}

    return [dec(q) for q in queries], [dec(c) for c in cands]


def embed(model_dir: Path, items: tuple[list[dict], list[dict]], overrides: dict | None = None) -> np.ndarray:
    """Query then candidate embeddings (N, D); `overrides` as `Embedder.load`'s cfg_overrides."""
    from umarvel_ray.model.embedder import Embedder

    emb = Embedder.load(model_dir, cfg_overrides=overrides)
    return np.concatenate([emb.encode_queries(items[0]), emb.encode_candidates(items[1])])
