"""The embedding directories a mining or teacher-scoring job reads: a query subset file kept beside
its embeddings (`subset_input`), and `ensure_embeddings`, which reuses a complete directory made from
the same input bytes by the same weights, and otherwise runs (or resumes) the embedding job.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from umarvel_ray.config import ConfigError
from umarvel_ray.embed.run import EmbedConfig, EmbedResult, run_embedding
from umarvel_ray.io import file_sha256, write_if_changed

log = logging.getLogger("umarvel_ray.mine")


def subset_input(path: Path, lines: list[bytes], embed_dir: Path, name: str) -> Path:
    """A jsonl holding exactly `lines`, kept in `embed_dir/_input/` beside the embeddings made from it.

    It lives with the embeddings (not the job's output) so that another job pointed at the same
    embedding directory sees the same input path and reuses the shards. Rewritten only on change.
    """
    target = embed_dir / "_input" / name
    write_if_changed(target, b"".join(lines))
    log.info("using %d lines of %s via %s", len(lines), path, target)
    return target


def complete_embeddings_match(
    output_dir: Path, kind: str, input_path: Path, model: str, adapter: str | None, template: EmbedConfig
) -> str | None:
    """None when `output_dir` holds complete `kind` embeddings of these input bytes by these weights.

    Also compares the query instruction settings; otherwise returns why the directory does not
    match (then `run_embedding` decides: resume, recompute, or refuse with a ConfigError).
    """
    from umarvel_ray.embed.run import model_signature
    from umarvel_ray.store import read_manifest

    manifest = read_manifest(output_dir) if output_dir.is_dir() else {}
    settings = manifest.get("settings") or {}
    if not manifest.get("complete"):
        return "no complete manifest"
    if manifest.get("kind") != kind:
        return f"holds {manifest.get('kind')} embeddings"
    if settings.get("input_sha256") != file_sha256(input_path):
        return "made from other input bytes"
    if settings.get("model_signature") != model_signature(Path(model), adapter):
        return "made with other model weights"
    if kind == "query":
        instr = settings.get("instruction") or {}
        fixed = template.prompt_index is not None
        if instr.get("mode") != ("fixed" if fixed else "random") or (
            instr.get("prompt_index") if fixed else instr.get("seed")
        ) != (template.prompt_index if fixed else template.instruction_seed):
            return "made with other instruction settings"
    return None


def ensure_embeddings(
    template: EmbedConfig,
    *,
    kind: str,
    input_path: Path,
    data_root: Path,
    model: str,
    adapter: str | None,
    output_dir: Path,
) -> tuple[Path, EmbedResult | None]:
    """Embeddings of `input_path` in `output_dir`: reused when complete, else (re)made or resumed.

    A complete directory made from the same input bytes by the same weights (and, for queries, the
    same instruction draw) is used as it is, without starting Ray. With `model` empty any complete
    directory of the right kind is used. Otherwise `run_embedding` runs, which resumes a partial
    directory shard by shard (and refuses one made with other settings unless embed.overwrite).
    """
    from umarvel_ray.store import read_manifest

    if not model:
        manifest = read_manifest(output_dir) if output_dir.is_dir() else {}
        if not manifest.get("complete"):
            raise ConfigError(f"model is empty and {output_dir} holds no complete {kind} embeddings")
        if manifest.get("kind") != kind:
            raise ConfigError(f"{output_dir} holds {manifest.get('kind')} embeddings, expected {kind}")
        log.info("reusing complete %s embeddings in %s (model %s)", kind, output_dir, manifest.get("model"))
        return output_dir, None
    why = complete_embeddings_match(output_dir, kind, input_path, model, adapter, template)
    if why is None:
        log.info("reusing complete %s embeddings in %s", kind, output_dir)
        return output_dir, None
    log.info("embedding %s -> %s (%s)", input_path, output_dir, why)
    cfg = dataclasses.replace(
        template,
        input=str(input_path),
        data_root=str(data_root),
        kind=kind,
        model=model,
        adapter=adapter,
        output_dir=str(output_dir),
    )
    return output_dir, run_embedding(cfg)
