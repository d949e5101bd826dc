"""The model's saved config (`umarvel_embedder.json` / `umarvel_reranker.json`): its one reader.

`Embedder.save_*` / `Reranker.save_*` write the file beside the weights (or the LoRA adapter):
{"config": <EmbedderConfig or RerankerConfig as a dict>, "tau": float, "dim": int, ...}.
Everything that needs a model's settings without loading its weights (`embedder.saved_embedder_config`,
`reranker.saved_reranker_config`) (pixel budgets for the decode
tasks, the embedding fingerprint, a training stage that continues from a model) asks here, with
the precedence `Embedder.load` uses: the adapter's file, else the model directory's, else defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EMBEDDER_META_FILE = "umarvel_embedder.json"
RERANKER_META_FILE = "umarvel_reranker.json"

PathLike = str | os.PathLike[str]


def read_saved_meta(meta_file: str, *dirs: PathLike | None) -> dict[str, Any]:
    """The parsed `meta_file` of the first of `dirs` (None entries skipped) that holds one; {} if none."""
    for d in dirs:
        if d is not None and d != "" and (Path(d) / meta_file).is_file():
            return json.loads((Path(d) / meta_file).read_text())
    return {}


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """`base` with `overrides` applied: a nested dict (deep-merged, unknown keys raise) or
    `a.b=value` strings (`config.apply_overrides`)."""
    from umarvel_ray.config import apply_overrides, deep_update

    if overrides is None:
        return base
    if isinstance(overrides, dict):
        deep_update(base, overrides, "cfg_overrides")
        return base
    return apply_overrides(base, list(overrides))


def saved_config(
    config_cls: type, meta_file: str, model: PathLike, adapter: PathLike | None = None, overrides: Any = None
) -> Any:
    """The `config_cls` instance that loading `model` (+ `adapter`) with `overrides` resolves, without
    loading weights: the saved "config" of `meta_file` (adapter first, then model; else the class
    defaults), `model` set to the given path, then `overrides` (`merge_overrides`)."""
    from umarvel_ray.config import from_dict, to_dict

    meta = read_saved_meta(meta_file, adapter, model)
    data = meta.get("config") or to_dict(config_cls())
    data["model"] = str(model)
    return from_dict(config_cls, merge_overrides(data, overrides))


def saved_pixel_budget(config: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a resolved embedder/reranker config's image inputs."""
    return int(config.inputs.min_pixels), int(config.inputs.max_pixels)


__all__ = [
    "EMBEDDER_META_FILE",
    "RERANKER_META_FILE",
    "merge_overrides",
    "read_saved_meta",
    "saved_config",
    "saved_pixel_budget",
]
