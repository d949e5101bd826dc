"""Resolve what the app serves from what the batch jobs wrote, and fail before deploying if absent.

`embeddings_dir/manifest.json` names the pool jsonl, data_root and text rule the pool was embedded
with; the index dir holds one saved index; model dirs carry their own pixel budgets. Explicit
config values win over the manifest; a value that neither gives is an error naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from umarvel_ray.config import ConfigError, require_absolute
from umarvel_ray.serve.config import ServeConfig


@dataclass(frozen=True)
class Sources:
    """Absolute, checked inputs of one served app."""

    model_dir: str
    reranker_dir: str | None
    index: str
    pool: str
    data_root: str
    text_rule: str
    embed_pixels: tuple[int, int]
    rerank_pixels: tuple[int, int]


def find_index(index_dir: str) -> Path:
    """A saved index base path, or the one index (`*.meta.json`) inside a directory."""
    p = Path(index_dir)
    if p.is_dir():
        metas = sorted(p.glob("*.meta.json"))
        if len(metas) != 1:
            raise ConfigError(f"index_dir={index_dir}: expected exactly one saved index (*.meta.json), found {len(metas)}")
        return metas[0].with_name(metas[0].name[: -len(".meta.json")])
    if not p.with_name(p.name + ".meta.json").is_file():
        raise ConfigError(f"index_dir={index_dir}: no saved index there ({p.name}.meta.json missing)")
    return p


def resolve_sources(cfg: ServeConfig) -> Sources:
    """Check the config against the files on disk; raise ConfigError naming the missing piece."""
    from umarvel_ray.data.model_items import TEXT_RULES
    from umarvel_ray.model.embedder import saved_embedder_config
    from umarvel_ray.model.reranker import saved_reranker_config
    from umarvel_ray.model.saved import saved_pixel_budget

    require_absolute(cfg)
    if not cfg.model_dir or not Path(cfg.model_dir).is_dir():
        raise ConfigError(f"model_dir must be an embedder model directory, got {cfg.model_dir!r}")
    if cfg.reranker_dir and not Path(cfg.reranker_dir).is_dir():
        raise ConfigError(f"reranker_dir is not a directory: {cfg.reranker_dir}")
    if not cfg.index_dir:
        raise ConfigError("index_dir is required (a saved index from jobs/build_index.py)")
    index = find_index(cfg.index_dir)
    manifest: dict = {}
    if cfg.embeddings_dir:
        mf = Path(cfg.embeddings_dir) / "manifest.json"
        if not mf.is_file():
            raise ConfigError(f"embeddings_dir={cfg.embeddings_dir}: manifest.json missing (embedding job unfinished?)")
        manifest = json.loads(mf.read_text())
    settings = manifest.get("settings", {})  # what the embedding job ran with (embed/run.py)
    pool = cfg.pool or manifest.get("input", "")
    data_root = cfg.data_root or settings.get("data_root", "")
    if cfg.pool and not Path(pool).is_absolute() and data_root:
        pool = str(Path(data_root) / pool)
    text_rule = cfg.text_rule or settings.get("text_rule") or "uniir"
    if not pool or not Path(pool).is_file():
        raise ConfigError(f"pool jsonl not found ({pool!r}): set pool=... or embeddings_dir=...")
    if not data_root or not Path(data_root).is_dir():
        raise ConfigError(f"data_root not found ({data_root!r}): set data_root=... or embeddings_dir=...")
    if text_rule not in TEXT_RULES:
        raise ConfigError(f"text_rule must be one of {TEXT_RULES}, got {text_rule!r}")
    return Sources(
        model_dir=cfg.model_dir,
        reranker_dir=cfg.reranker_dir or None,
        index=str(index),
        pool=str(pool),
        data_root=str(data_root),
        text_rule=text_rule,
        embed_pixels=saved_pixel_budget(saved_embedder_config(cfg.model_dir)),
        rerank_pixels=saved_pixel_budget(saved_reranker_config(cfg.reranker_dir)) if cfg.reranker_dir else (0, 0),
    )
