"""Hard-negative mining for stage 4 (U-MARVEL; MM-Embed's modality-aware variant as an option).

Steps (the U-MARVEL recipe's hard-negative mining, and MM-Embed's modality-aware hard negatives):

1. Embed every training query (`query/train/mbeir_union_up_train.jsonl`, instructions drawn per
   query, seeded by qid) and the union training pool with the given (stage-3) model, through the
   Ray Data embedding pipeline (`run_embedding`). Both embedding directories are restartable and
   are reused when already complete; they can be shared with other jobs via `query_embeddings` /
   `pool_embeddings`.
2. Exact top-`depth` (100) inner-product search of every query over the mixed-modality pool with
   the index module (faiss Flat on CPU, faiss-gpu or torch matmul on a GPU driver). Query vectors
   stream from their parquet shards; only the pool index is held in memory.
3. `select_negatives` per query (`mine/select.py`, a pure function, unit tested on its own).

With `pool=local` step 2 searches each task's own LOCAL pool instead (`index/local_pool.py`: same
dataset, the task's candidate modality), so every negative is a same-modality distractor of the
kind the re-ranker must judge (docs/RECIPE.md section 3: "a negative sampled from the stage-3
model's local top-100"); queries whose task has no local pool get no negatives (listed).

Outputs in `output_dir`: `negatives.jsonl` (`{"qid", "neg_dids", "n_candidates"}`, sorted by qid),
`no_negatives.jsonl` (queries for which nothing was eligible: counted and listed, never silently
dropped), `summary.json` (counts, per task too), `config.yaml`. The search and selection are not
checkpointed (they are cheap next to embedding and fully deterministic); a rerun repeats them.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.data.artefacts import NO_NEGATIVES_FILE, write_negatives
from umarvel_ray.data.queries import QueryMeta, qid_sort_key, read_query_meta
from umarvel_ray.embed.ensure import ensure_embeddings, subset_input
from umarvel_ray.embed.train_pool import SUMMARY_NAME, start_run
from umarvel_ray.io import atomic_write_json
from umarvel_ray.mine.config import MineConfig, MineResult, validate_config
from umarvel_ray.mine.select import Selection, select_negatives

log = logging.getLogger("umarvel_ray.mine")


@dataclass
class _Inputs:
    """The queries to mine and where their embeddings and the pool's are (complete once made)."""

    metas: dict[str, QueryMeta]
    n_read: int
    invalid: int
    q_input: Path
    q_dir: Path
    p_dir: Path


@dataclass
class _Tally:
    """Negatives and the per-query accounting of one mining pass (what summary.json counts)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    empty: list[dict[str, Any]] = field(default_factory=list)
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    totals: dict[str, int] = field(
        default_factory=lambda: dict(positives_skipped=0, filtered_max_score=0, c1=0, c2=0, unknown_qids=0)
    )
    embedded: set[str] = field(default_factory=set)

    def add(self, qid: str, meta: QueryMeta, sel: Selection, num_negatives: int) -> None:
        """Count one query's selection; keep its negatives, or list it in no_negatives when empty."""
        t = self.per_task.setdefault(meta.task, dict(queries=0, full=0, padded=0, no_negatives=0))
        t["queries"] += 1
        self.totals["positives_skipped"] += sel.n_positives_skipped
        self.totals["filtered_max_score"] += sel.n_filtered
        self.totals["c1"] += sel.n_c1
        self.totals["c2"] += sel.n_c2
        if not sel.neg_dids:
            t["no_negatives"] += 1
            self.empty.append(
                {
                    "qid": qid,
                    "task": meta.task,
                    "positives_in_topk": sel.n_positives_skipped,
                    "filtered_max_score": sel.n_filtered,
                }
            )
            return
        t["full" if sel.n_candidates >= num_negatives else "padded"] += 1
        self.records.append({"qid": qid, "neg_dids": sel.neg_dids, "n_candidates": sel.n_candidates})


def _embed_inputs(cfg: MineConfig, root: Path, qf: Path, pf: Path, out: Path) -> _Inputs:
    """Read the queries' metadata and make sure both embedding directories are complete.

    With `max_queries` the first N query lines are embedded from a subset file kept beside their
    embeddings, and the default query directory is named after N, so it never mixes with a full run.
    """
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
    return _Inputs(metas, n_read, invalid, q_input, q_dir, p_dir)


def _pool_modalities(cfg: MineConfig, p_dir: Path) -> dict[str, str] | None:
    """did -> modality of the pool, which only the modality-aware (mmembed) rule needs."""
    from umarvel_ray.store import read_embeddings

    if cfg.strategy != "mmembed":
        return None
    pool = read_embeddings(p_dir, columns=("id", "modality"))
    assert pool.modalities is not None
    return dict(zip(pool.ids.tolist(), pool.modalities.tolist(), strict=True))


def _search_and_select(cfg: MineConfig, inp: _Inputs) -> tuple[_Tally, int]:
    """Top-`depth` of every embedded query over the pool, then `select_negatives` on each list.

    Query vectors stream from their shards in `search_batch` rows; only the pool index is held.
    Returns the tally and the pool's size.
    """
    from umarvel_ray.index.service import pool_index
    from umarvel_ray.progress import Progress
    from umarvel_ray.store import iter_embedding_batches

    tally = _Tally()
    with pool_index(
        inp.p_dir,
        cfg.index_shards,
        cfg.index_shard_cpus,
        factory="Flat",
        fp16=cfg.index_fp16,
        device=cfg.index_device,
        backend=cfg.index_backend,
    ) as index:
        modality = _pool_modalities(cfg, inp.p_dir)
        prog = Progress(f"mine {cfg.strategy}", total=len(inp.metas), unit="queries")
        for batch in iter_embedding_batches(inp.q_dir, cfg.search_batch, columns=("id", "vector")):
            assert batch.vectors is not None
            scores, ids = index.search_arrays(batch.vectors, cfg.depth, batch_size=cfg.search_batch)
            for row, qid in enumerate(batch.ids.tolist()):
                meta = inp.metas.get(qid)
                if meta is None:  # an embedding dir made from another query file
                    tally.totals["unknown_qids"] += 1
                    continue
                tally.embedded.add(qid)
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
                tally.add(qid, meta, sel, cfg.num_negatives)
            prog.update(len(batch))
        pool_size = len(index)
    return tally, pool_size


def _search_local(cfg: MineConfig, inp: _Inputs) -> tuple[_Tally, int]:
    """`pool=local`: top-`depth` of every query over its task's local pool, then `select_negatives`.

    Returns the tally and the size of the union pool the local pools are cut from.
    """
    from umarvel_ray.index.local_pool import retrieve_local
    from umarvel_ray.store import read_embeddings

    tally = _Tally()
    metas = sorted(inp.metas.values(), key=lambda m: qid_sort_key(m.qid))
    found, no_pool = retrieve_local(
        metas, inp.q_dir, inp.p_dir, cfg.depth, cfg.index_backend, cfg.index_device,
        cfg.index_shards, cfg.index_shard_cpus,
    )  # fmt: skip
    for rq in found:
        tally.embedded.add(rq.meta.qid)
        sel = select_negatives(
            rq.candidates, rq.cos, rq.meta.positives, num=cfg.num_negatives, max_score=cfg.max_score
        )
        tally.add(rq.meta.qid, rq.meta, sel, cfg.num_negatives)
    for qid in no_pool:
        tally.embedded.add(qid)
        tally.add(qid, inp.metas[qid], Selection([], 0), cfg.num_negatives)
    return tally, len(read_embeddings(inp.p_dir, columns=("id",)).ids)


def _write_summary(
    cfg: MineConfig,
    out: Path,
    inp: _Inputs,
    counts: dict[str, Any],
    tally: _Tally,
    pool_size: int,
    seconds: float,
) -> None:
    """summary.json: the counts, per task too, and the settings that produced them."""
    atomic_write_json(
        out / SUMMARY_NAME,
        {
            "counts": counts,
            "per_task": dict(sorted(tally.per_task.items())),
            "strategy": cfg.strategy,
            "pool": cfg.pool,
            "depth": cfg.depth,
            "num_negatives": cfg.num_negatives,
            "max_score": cfg.max_score,
            "pool_size": pool_size,
            "query_embeddings": str(inp.q_dir),
            "pool_embeddings": str(inp.p_dir),
            "seconds": round(seconds, 2),
        },
    )


def _counts(inp: _Inputs, tally: _Tally) -> dict[str, Any]:
    """The job's counts (summary.json and the SUMMARY line), every query accounted for."""
    per_task = tally.per_task
    return {
        "queries_read": inp.n_read,
        "queries_invalid": inp.invalid,
        "queries_not_embedded": len(set(inp.metas) - tally.embedded),
        "queries_mined": len(tally.embedded),
        "queries_written": len(tally.records),
        "full": sum(t["full"] for t in per_task.values()),
        "padded": sum(t["padded"] for t in per_task.values()),
        "no_negatives": len(tally.empty),
        **tally.totals,
    }


def run_mining(cfg: MineConfig) -> MineResult:
    """Embed, search top-`depth`, select negatives; write negatives.jsonl + summary.json."""
    from umarvel_ray.progress import summary

    t0 = time.perf_counter()
    root, qf, pf, out = start_run(cfg, validate_config)

    inp = _embed_inputs(cfg, root, qf, pf, out)
    tally, pool_size = (_search_local if cfg.pool == "local" else _search_and_select)(cfg, inp)
    if tally.totals["unknown_qids"]:
        unknown = tally.totals["unknown_qids"]
        log.warning("%d query embeddings have no record in %s (ignored)", unknown, inp.q_input)

    tally.records.sort(key=lambda r: qid_sort_key(r["qid"]))
    tally.empty.sort(key=lambda r: qid_sort_key(r["qid"]))
    neg_path = write_negatives(out, tally.records, tally.empty)
    seconds = time.perf_counter() - t0
    counts = _counts(inp, tally)
    _write_summary(cfg, out, inp, counts, tally, pool_size, seconds)
    if tally.empty:
        listed = out / NO_NEGATIVES_FILE
        log.warning("%d queries got no negatives at all (listed in %s)", len(tally.empty), listed)
    line = summary(f"mine {cfg.strategy} pool={cfg.pool}", **counts, seconds=f"{seconds:.1f}", output=str(neg_path))
    return MineResult(out, counts, seconds, line, negatives_path=neg_path)
