"""Hard-negative mining for stage 4 (U-MARVEL; MM-Embed's modality-aware variant as an option).

Steps (RECIPE.md section 3 "Hard-negative mining", section 4 "Modality-aware hard negatives"):

1. Embed every training query (`query/train/mbeir_union_up_train.jsonl`, instructions drawn per
   query, seeded by qid) and the union training pool with the given (stage-3) model, through the
   Ray Data embedding pipeline (`run_embedding`). Both embedding directories are restartable and
   are reused when already complete; they can be shared with other jobs via `query_embeddings` /
   `pool_embeddings`.
2. Exact top-`depth` (100) inner-product search of every query over the mixed-modality pool with
   the index module (faiss Flat on CPU, faiss-gpu or torch matmul on a GPU driver). Query vectors
   stream from their parquet shards; only the pool index is held in memory.
3. `select_negatives` per query (a pure function, unit tested on its own):
   - "umarvel": walk the ranked list, skip labelled positives (and, with `max_score`, candidates
     scoring above it: likely false negatives), keep the first `num`; pad by repeating when short.
   - "mmembed": C1 = wrong-modality candidates ranked above the first positive, C2 = right-modality
     candidates at ranks 46-50 (1-based, configurable); sample `num` from C1 u C2 with a per-query
     RNG seeded by (seed, qid); pad by repeating when short.

Outputs in `output_dir`: `negatives.jsonl` (`{"qid", "neg_dids", "n_candidates"}`, sorted by qid),
`no_negatives.jsonl` (queries for which nothing was eligible: counted and listed, never silently
dropped), `summary.json` (counts, per task too), `config.yaml`. The search and selection are not
checkpointed (they are cheap next to embedding and fully deterministic); a rerun repeats them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.data import mbeir
from umarvel_ray.data.artefacts import NO_NEGATIVES_FILE, write_negatives
from umarvel_ray.data.queries import qid_sort_key, read_query_meta
from umarvel_ray.data.tasks import job_train_inputs
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.embed.run import EmbedResult, run_embedding
from umarvel_ray.index.options import index_shards_option, shard_cpus_option
from umarvel_ray.io import atomic_write_json, file_sha256, write_if_changed

log = logging.getLogger("umarvel_ray.mine")

STRATEGIES = ("umarvel", "mmembed")
SUMMARY_NAME = "summary.json"
PAD_ID = ""  # the index pads rows shorter than k with id "" (see umarvel_ray.index.base)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class MineConfig:
    """Settings of one mining job (`jobs/mine_negatives.py --config CFG key=value ...`)."""

    data_root: str = field(default="", metadata={"path": "cwd", "help": "M-BEIR root (files and images resolve against it)"})
    model: str = field(
        default="",
        metadata={"path": "model", "help": "embedder (stage-3) model dir; may be empty when both embedding dirs are complete"},
    )
    adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional LoRA adapter directory"})
    output_dir: str = field(default="", metadata={"path": "cwd", "help": "where negatives.jsonl, summary.json go"})
    query_file: str = field(default=mbeir.TRAIN_QUERY_FILE, metadata={"path": "data", "help": "training queries jsonl"})
    pool_file: str = field(default=mbeir.TRAIN_POOL_FILE, metadata={"path": "data", "help": "union training pool jsonl"})
    query_embeddings: str | None = field(
        default=None,
        metadata={"path": "cwd", "help": "query embedding dir; null = <output_dir>/embeddings/queries[-firstN]"},
    )
    pool_embeddings: str | None = field(
        default=None, metadata={"path": "cwd", "help": "pool embedding dir; null = <output_dir>/embeddings/pool"}
    )
    depth: int = field(default=100, metadata={"help": "retrieval depth (top-k searched per query)"})
    num_negatives: int = field(default=5, metadata={"help": "negatives kept per query"})
    strategy: str = field(default="umarvel", metadata={"help": "umarvel | mmembed"})
    max_score: float | None = field(
        default=None,
        metadata={"help": "drop candidates scoring above this (0.7 in the ablation); null = off"},
    )
    c2_ranks: list[int] = field(
        default_factory=lambda: [46, 50],
        metadata={"help": "mmembed: 1-based inclusive rank range of right-modality negatives (C2)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the mmembed sampling (per query: seed, qid)"})
    max_queries: int | None = field(
        default=None, metadata={"help": "mine only the first N query lines (tests, smoke runs)"}
    )
    search_batch: int = field(default=4096, metadata={"help": "queries per index search call"})
    index_backend: str = field(default="auto", metadata={"help": "auto | faiss | torch"})
    index_device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    index_fp16: bool = field(default=False, metadata={"help": "fp16 index storage (not bit-exact)"})
    index_shards: int = index_shards_option()
    index_shard_cpus: float = shard_cpus_option()
    embed: EmbedConfig = field(
        default_factory=EmbedConfig,
        metadata={
            "help": "embedding settings; input/output_dir/kind/model/adapter/data_root are set by the job"
        },
    )


@dataclass
class MineResult:
    """What one `run_mining` call produced."""

    output_dir: Path
    negatives_path: Path
    counts: dict[str, Any]
    seconds: float
    summary: str = ""


# ---------------------------------------------------------------------------------------------
# The selection rule (pure)
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Negatives of one query and how they were found.

    `n_candidates` is the number of distinct eligible candidates the rule could draw from (before
    truncation to `num` and before padding): < num means padded, 0 means no negatives at all.
    """

    neg_dids: list[str]
    n_candidates: int
    n_positives_skipped: int = 0
    n_filtered: int = 0
    n_c1: int = 0
    n_c2: int = 0


def pad_repeat(items: Sequence[str], num: int) -> list[str]:
    """`items` cycled to exactly `num` entries ([a, b] -> [a, b, a, b, a]); [] stays []."""
    if not items:
        return []
    return [items[i % len(items)] for i in range(num)]


def _modality_lookup(cand_modality: Mapping[str, str] | Callable[[str], str] | None) -> Callable[[str], str]:
    if cand_modality is None:
        raise ValueError("strategy 'mmembed' needs cand_modality (a did -> modality mapping or callable)")
    if callable(cand_modality) and not isinstance(cand_modality, Mapping):
        return cand_modality
    table = cand_modality

    def lookup(did: str) -> str:
        try:
            return table[did]
        except KeyError:
            raise KeyError(f"no modality known for candidate {did!r}") from None

    return lookup


def select_negatives(
    ranked_ids: Sequence[str],
    ranked_scores: Sequence[float],
    positives: Iterable[str],
    num: int = 5,
    strategy: str = "umarvel",
    max_score: float | None = None,
    cand_modality: Mapping[str, str] | Callable[[str], str] | None = None,
    query_target_modality: str | None = None,
    rng: random.Random | None = None,
    c2_ranks: tuple[int, int] | Sequence[int] = (46, 50),
) -> Selection:
    """Pick `num` hard negatives from one query's ranked list (best first).

    Padding ids ("") are ignored; labelled positives are never returned; with `max_score`,
    candidates scoring strictly above it are dropped. "umarvel" keeps the first `num` eligible
    candidates in rank order. "mmembed" samples (with `rng`) from C1 u C2: C1 = eligible
    candidates whose modality differs from `query_target_modality` ranked above the first
    positive (all of the list when no positive was retrieved), C2 = eligible right-modality
    candidates at 1-based ranks `c2_ranks[0]..c2_ranks[1]`; the sample is returned in rank order.
    Both pad by repeating when fewer than `num` are eligible; none eligible -> `neg_dids == []`.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(ranked_ids) != len(ranked_scores):
        raise ValueError(f"{len(ranked_ids)} ids but {len(ranked_scores)} scores")
    pos = set(positives)
    eligible: list[tuple[int, str]] = []  # (0-based rank, did)
    seen: set[str] = set()
    first_pos: int | None = None
    n_pos = n_filtered = 0
    for rank, (did, score) in enumerate(zip(ranked_ids, ranked_scores, strict=True)):
        if did == PAD_ID or did in seen:
            continue
        seen.add(did)
        if did in pos:
            n_pos += 1
            if first_pos is None:
                first_pos = rank
            continue
        if max_score is not None and float(score) > max_score:
            n_filtered += 1
            continue
        eligible.append((rank, did))

    if strategy == "umarvel":
        chosen = [d for _, d in eligible[:num]]
        return Selection(pad_repeat(chosen, num), len(eligible), n_pos, n_filtered)

    if query_target_modality is None:
        raise ValueError("strategy 'mmembed' needs query_target_modality")
    if rng is None:
        raise ValueError("strategy 'mmembed' needs an rng")
    lo, hi = int(c2_ranks[0]), int(c2_ranks[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"c2_ranks must satisfy 1 <= lo <= hi, got {lo}, {hi}")
    modality_of = _modality_lookup(cand_modality)
    above = len(ranked_ids) if first_pos is None else first_pos
    c1 = [(r, d) for r, d in eligible if r < above and modality_of(d) != query_target_modality]
    c2 = [(r, d) for r, d in eligible if lo - 1 <= r <= hi - 1 and modality_of(d) == query_target_modality]
    pool = sorted(c1 + c2)
    if len(pool) > num:
        pool = sorted(rng.sample(pool, num))
    chosen = [d for _, d in pool]
    return Selection(pad_repeat(chosen, num), len(c1) + len(c2), n_pos, n_filtered, len(c1), len(c2))


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the teacher pipeline)
# ---------------------------------------------------------------------------------------------


def resolve(base: Path, p: str | os.PathLike[str]) -> Path:
    """`p` if absolute, else relative to `base`."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


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
    from umarvel_ray.embed.config import model_signature
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


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def validate_config(cfg: MineConfig) -> tuple[Path, Path, Path, Path]:
    """(data_root, query file, pool file, output dir) after checking the config."""
    if not cfg.data_root or not Path(cfg.data_root).expanduser().is_dir():
        raise ConfigError(f"data_root must be an existing directory, got {cfg.data_root!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.depth < 1 or cfg.num_negatives < 1 or cfg.search_batch < 1:
        raise ConfigError("depth, num_negatives and search_batch must be >= 1")
    if cfg.index_shards < 0 or cfg.index_shard_cpus <= 0:
        raise ConfigError("index_shards must be >= 0 and index_shard_cpus > 0")
    if cfg.max_queries is not None and cfg.max_queries < 1:
        raise ConfigError(f"max_queries must be >= 1 or null, got {cfg.max_queries}")
    if len(cfg.c2_ranks) != 2 or not 1 <= cfg.c2_ranks[0] <= cfg.c2_ranks[1]:
        raise ConfigError(f"c2_ranks must be [lo, hi] with 1 <= lo <= hi, got {cfg.c2_ranks}")
    if cfg.strategy == "mmembed" and cfg.depth < cfg.c2_ranks[1]:
        raise ConfigError(f"mmembed needs depth >= {cfg.c2_ranks[1]} (c2_ranks), got {cfg.depth}")
    if cfg.model and not Path(cfg.model).expanduser().is_dir():
        raise ConfigError(f"model directory not found: {cfg.model}")
    return job_train_inputs(cfg.data_root, cfg.query_file, cfg.pool_file, cfg.output_dir)


def run_mining(cfg: MineConfig) -> MineResult:
    """Embed, search top-`depth`, select negatives; write negatives.jsonl + summary.json."""
    require_absolute(cfg)
    from umarvel_ray.index.service import pool_index
    from umarvel_ray.progress import Progress, summary
    from umarvel_ray.store import iter_embedding_batches, read_embeddings

    t0 = time.perf_counter()
    root, qf, pf, out = validate_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)

    default_q = "queries" if cfg.max_queries is None else f"queries-first{cfg.max_queries}"
    q_dir = (
        Path(cfg.query_embeddings).expanduser() if cfg.query_embeddings else out / "embeddings" / default_q
    )
    metas, lines, n_read, invalid = read_query_meta(
        qf, cfg.max_queries, keep_lines=cfg.max_queries is not None
    )
    q_input = qf
    if cfg.max_queries is not None:
        q_input = subset_input(qf, lines, q_dir, f"{qf.stem}.first{cfg.max_queries}.jsonl")
    p_dir = Path(cfg.pool_embeddings).expanduser() if cfg.pool_embeddings else out / "embeddings" / "pool"
    common = dict(data_root=root, model=cfg.model, adapter=cfg.adapter)
    ensure_embeddings(cfg.embed, kind="candidate", input_path=pf, output_dir=p_dir, **common)
    ensure_embeddings(cfg.embed, kind="query", input_path=q_input, output_dir=q_dir, **common)

    with pool_index(
        p_dir,
        cfg.index_shards,
        cfg.index_shard_cpus,
        factory="Flat",
        fp16=cfg.index_fp16,
        device=cfg.index_device,
        backend=cfg.index_backend,
    ) as index:
        modality: dict[str, str] | None = None
        if cfg.strategy == "mmembed":
            pool = read_embeddings(p_dir, columns=("id", "modality"))
            assert pool.modalities is not None
            modality = dict(zip(pool.ids.tolist(), pool.modalities.tolist(), strict=True))

        records: list[dict[str, Any]] = []
        empty: list[dict[str, Any]] = []
        per_task: dict[str, dict[str, int]] = {}
        totals = dict(positives_skipped=0, filtered_max_score=0, c1=0, c2=0, unknown_qids=0)
        embedded: set[str] = set()
        prog = Progress(f"mine {cfg.strategy}", total=len(metas), unit="queries")
        for batch in iter_embedding_batches(q_dir, cfg.search_batch, columns=("id", "vector")):
            assert batch.vectors is not None
            scores, ids = index.search_arrays(batch.vectors, cfg.depth, batch_size=cfg.search_batch)
            for row, qid in enumerate(batch.ids.tolist()):
                meta = metas.get(qid)
                if meta is None:  # an embedding dir made from another query file
                    totals["unknown_qids"] += 1
                    continue
                embedded.add(qid)
                sel = select_negatives(
                    ids[row].tolist(),
                    scores[row].tolist(),
                    meta.positives,
                    num=cfg.num_negatives,
                    strategy=cfg.strategy,
                    max_score=cfg.max_score,
                    cand_modality=modality,
                    query_target_modality=meta.target_modality,
                    rng=random.Random(f"{cfg.seed}:{qid}") if cfg.strategy == "mmembed" else None,
                    c2_ranks=tuple(cfg.c2_ranks),
                )
                t = per_task.setdefault(meta.task, dict(queries=0, full=0, padded=0, no_negatives=0))
                t["queries"] += 1
                totals["positives_skipped"] += sel.n_positives_skipped
                totals["filtered_max_score"] += sel.n_filtered
                totals["c1"] += sel.n_c1
                totals["c2"] += sel.n_c2
                if not sel.neg_dids:
                    t["no_negatives"] += 1
                    empty.append(
                        {
                            "qid": qid,
                            "task": meta.task,
                            "positives_in_topk": sel.n_positives_skipped,
                            "filtered_max_score": sel.n_filtered,
                        }
                    )
                    continue
                t["full" if sel.n_candidates >= cfg.num_negatives else "padded"] += 1
                records.append({"qid": qid, "neg_dids": sel.neg_dids, "n_candidates": sel.n_candidates})
            prog.update(len(batch))
        pool_size = len(index)
    if totals["unknown_qids"]:
        log.warning("%d query embeddings have no record in %s (ignored)", totals["unknown_qids"], q_input)

    records.sort(key=lambda r: qid_sort_key(r["qid"]))
    empty.sort(key=lambda r: qid_sort_key(r["qid"]))
    neg_path = write_negatives(out, records, empty)
    seconds = time.perf_counter() - t0
    counts: dict[str, Any] = {
        "queries_read": n_read,
        "queries_invalid": invalid,
        "queries_not_embedded": len(set(metas) - embedded),
        "queries_mined": len(embedded),
        "queries_written": len(records),
        "full": sum(t["full"] for t in per_task.values()),
        "padded": sum(t["padded"] for t in per_task.values()),
        "no_negatives": len(empty),
        **totals,
    }
    atomic_write_json(
        out / SUMMARY_NAME,
        {
            "counts": counts,
            "per_task": dict(sorted(per_task.items())),
            "strategy": cfg.strategy,
            "depth": cfg.depth,
            "num_negatives": cfg.num_negatives,
            "max_score": cfg.max_score,
            "pool_size": pool_size,
            "query_embeddings": str(q_dir),
            "pool_embeddings": str(p_dir),
            "seconds": round(seconds, 2),
        },
    )
    if empty:
        log.warning("%d queries got no negatives at all (listed in %s)", len(empty), out / NO_NEGATIVES_FILE)
    line = summary(f"mine {cfg.strategy}", **counts, seconds=f"{seconds:.1f}", output=str(neg_path))
    return MineResult(out, neg_path, counts, seconds, line)


__all__ = [
    "MineConfig",
    "MineResult",
    "Selection",
    "pad_repeat",
    "run_mining",
    "select_negatives",
]
