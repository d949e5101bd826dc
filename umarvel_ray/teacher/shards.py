"""The re-ranker's P(Yes) for every retrieved pair, restartable by shard.

Results are committed per shard of `shard_queries` consecutive (qid-sorted) queries to
`_shards/teacher-NNNNN.json`, each stamped with a key over the re-ranker identity, input settings
and the shard's exact (qid, candidates) lists. A rerun repeats the (cheap, deterministic)
retrieval, recomputes the keys and re-scores only shards whose file is missing or whose key
differs; the scores are then read back from the shard files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import resolve_against
from umarvel_ray.embed.config import model_signature
from umarvel_ray.index.local_pool import RetrievedQuery
from umarvel_ray.io import atomic_write_json
from umarvel_ray.rerank.offsets import scan_offsets
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.teacher.rerank import ShardPYes, reranker_pixels, run_reranker

log = logging.getLogger("umarvel_ray.teacher")

SHARDS_DIR = "_shards"


@dataclass
class Scored:
    """P(Yes) by qid (per candidate rank, None where the pair was rejected) and the shard counts."""

    p_yes: ShardPYes = field(default_factory=dict)
    shards_written: int = 0
    shards_skipped: int = 0
    pairs_rejected: int = 0


def _shard_key(base: dict[str, Any], shard: list[RetrievedQuery]) -> str:
    h = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
    for q in shard:
        h.update(json.dumps([q.meta.qid, q.candidates]).encode())
    return h.hexdigest()


def _shard_path(out: Path, i: int) -> Path:
    return out / SHARDS_DIR / f"teacher-{i:05d}.json"


def _load_shard(path: Path, key: str) -> dict[str, list[float | None]] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data["p_yes"] if data.get("key") == key else None


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _inputs(cfg: TeacherConfig, root: Path, qf: Path, pf: Path) -> tuple[dict[str, Any], tuple[int, int], dict[str, Any]]:
    """What the decode tasks read (`paths`), the pixel budget, and the identity every shard key covers.

    The key base names the re-ranker (path, weights signature, adapter, dtype), the pixel budget,
    the decode inputs and the two files' size and mtime, so a change to any of them re-scores.
    """
    instr = resolve_against(root, cfg.embed.instructions)
    min_px, max_px = reranker_pixels(cfg.reranker, cfg.reranker_adapter)
    pixels = (cfg.min_pixels or min_px, cfg.max_pixels or max_px)
    paths = {
        "query_path": str(qf),
        "pool_path": str(pf),
        "data_root": str(root),
        "instructions_path": str(instr),
        "prompt_index": cfg.embed.prompt_index,
        "seed": cfg.embed.instruction_seed,
    }
    base = {
        "reranker": str(Path(cfg.reranker).resolve()),
        "signature": model_signature(Path(cfg.reranker), cfg.reranker_adapter),
        "adapter": cfg.reranker_adapter,
        "dtype": cfg.reranker_dtype,
        "pixels": list(pixels),
        "inputs": paths,
        "files": [_file_id(qf), _file_id(pf)],
    }
    return paths, pixels, base


def _candidate_offsets(pf: Path, pending: dict[int, list[RetrievedQuery]]) -> dict[str, tuple[int, int]]:
    """Byte ranges of the pending shards' candidates in the pool file; every one must be there."""
    wanted = {d for shard in pending.values() for q in shard for d in q.candidates}
    offsets = scan_offsets(pf, wanted)
    missing = wanted - set(offsets)
    if missing:
        raise RuntimeError(f"{len(missing)} retrieved candidates not found in {pf}, e.g. {sorted(missing)[:3]}")
    return offsets


def score_shards(
    cfg: TeacherConfig, found: list[RetrievedQuery], root: Path, qf: Path, pf: Path, out: Path
) -> Scored:
    """P(Yes) of every retrieved pair: shards with a valid file are reused, the others scored."""
    paths, pixels, base = _inputs(cfg, root, qf, pf)
    shards = {
        i // cfg.shard_queries: found[i : i + cfg.shard_queries] for i in range(0, len(found), cfg.shard_queries)
    }
    keys = {s: _shard_key(base, shard) for s, shard in shards.items()}
    pending: dict[int, list[RetrievedQuery]] = {}
    for s, shard in shards.items():
        if _load_shard(_shard_path(out, s), keys[s]) is None:
            pending[s] = shard
    scored = Scored(shards_skipped=len(shards) - len(pending))
    log.info("re-ranker shards: %d to score, %d already done", len(pending), scored.shards_skipped)
    if pending:
        offsets = _candidate_offsets(pf, pending)

        def commit(s: int, p_yes: ShardPYes) -> None:
            atomic_write_json(_shard_path(out, s), {"key": keys[s], "p_yes": p_yes})

        scored.pairs_rejected = run_reranker(cfg, pending, offsets, paths, pixels, commit)
        scored.shards_written = len(pending)
    for s in shards:
        loaded = _load_shard(_shard_path(out, s), keys[s])
        if loaded is None:
            raise RuntimeError(f"shard {s} missing after scoring")
        scored.p_yes.update(loaded)
    return scored
