"""`ensure_embeddings`: the one "already embedded?" rule of every step that embeds an input
(evaluate, mine_negatives, teacher_scores).

Embed unless a complete embedding with the same model, settings and input already exists. The one
fingerprint is the `settings` that `run_embedding` records in the directory's manifest (input path,
sha256 and size, data_root, model path and weight signature (model and adapter files), dtype, kind,
shard size, query instruction file/mode/prompt/seed, pixel budget, text rule, duplicate check): the
settings it compares itself before resuming a partial directory. So a directory is reused exactly
when `run_embedding` would find nothing left to do, without starting Ray and without rewriting a
file; anything else goes to `run_embedding`, which resumes a partial directory shard by shard and
recomputes (or, without `overwrite`, refuses) one made with other settings.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError
from umarvel_ray.embed.config import EmbedConfig, settings_fingerprint, validate_config
from umarvel_ray.embed.decode import index_input
from umarvel_ray.embed.run import EmbedResult, run_embedding
from umarvel_ray.io import write_if_changed
from umarvel_ray.store import read_manifest

log = logging.getLogger("umarvel_ray.embed")


def embedding_settings(cfg: EmbedConfig) -> dict[str, Any]:
    """The `settings` that `run_embedding(cfg)` would record in the manifest (its fingerprint),
    computed without Ray: the config checked as the job checks it, the input scanned once."""
    res = validate_config(cfg)
    return settings_fingerprint(cfg, res, index_input(res.input, cfg.shard_rows, cfg.chunk_rows))


def why_not_reusable(cfg: EmbedConfig) -> str | None:
    """None when `cfg.output_dir` holds a complete embedding made with the settings `cfg` would
    record; else why not (for the log line that says why the input is embedded)."""
    out = Path(cfg.output_dir)
    manifest = read_manifest(out) if out.is_dir() else {}
    if not manifest.get("complete"):
        return "no complete manifest"
    if manifest.get("kind") != cfg.kind:
        return f"holds {manifest.get('kind')} embeddings"
    old, new = manifest.get("settings") or {}, embedding_settings(cfg)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"made with other settings (differs in {diff})" if diff else None


def _reuse_any_complete(output_dir: Path, kind: str) -> None:
    """No model given: any complete directory of the right kind is used as it is (a step pointed
    at embeddings made elsewhere); ConfigError when there is none."""
    manifest = read_manifest(output_dir) if output_dir.is_dir() else {}
    if not manifest.get("complete"):
        raise ConfigError(f"model is empty and {output_dir} holds no complete {kind} embeddings")
    if manifest.get("kind") != kind:
        raise ConfigError(f"{output_dir} holds {manifest.get('kind')} embeddings, expected {kind}")
    log.info("reusing complete %s embeddings in %s (model %s)", kind, output_dir, manifest.get("model"))


def subset_input(path: Path, lines: list[bytes], embed_dir: Path, name: str) -> Path:
    """A jsonl holding exactly `lines`, kept in `embed_dir/_input/` beside the embeddings made from it.

    It lives with the embeddings (not the job's output) so that another job pointed at the same
    embedding directory sees the same input path and reuses the shards. Rewritten only on change.
    """
    target = embed_dir / "_input" / name
    write_if_changed(target, b"".join(lines))
    log.info("using %d lines of %s via %s", len(lines), path, target)
    return target


def ensure_embeddings(
    template: EmbedConfig,
    *,
    kind: str,
    input_path: Path,
    data_root: Path,
    model: str,
    adapter: str | None,
    output_dir: Path,
    reuse: bool = True,
) -> tuple[Path, EmbedResult | None]:
    """Embeddings of `input_path` in `output_dir`: reused when complete and made with the same
    settings (result None), else (re)made or resumed by `run_embedding` (its result).

    `template` holds the embedding settings; input, data_root, kind, model, adapter and output_dir
    are the step's own and replace the template's. With `model` empty any complete directory of the
    right kind is used. `reuse=False` discards whatever `output_dir` holds and embeds anew.
    """
    if not model:
        _reuse_any_complete(output_dir, kind)
        return output_dir, None
    cfg = dataclasses.replace(
        template,
        input=str(input_path),
        data_root=str(data_root),
        kind=kind,
        model=model,
        adapter=adapter,
        output_dir=str(output_dir),
    )
    why = why_not_reusable(cfg) if reuse else "reuse disabled"
    if why is None:
        log.info("reusing complete %s embeddings in %s", kind, output_dir)
        return output_dir, None
    if not reuse:
        shutil.rmtree(output_dir, ignore_errors=True)
    log.info("embedding %s -> %s (%s)", input_path, output_dir, why)
    return output_dir, run_embedding(cfg)


__all__ = ["embedding_settings", "ensure_embeddings", "subset_input", "why_not_reusable"]
