"""Training examples for the five stages, deterministic per (seed, epoch, example).

An *example* is `{"query": item, "positive": item, "negatives": [item, ...]}` (or, for distillation,
`{"query": item, "candidates": [item, ...], "scores": [...]}`) whose items hold image *paths*
relative to the data root; images are decoded only when a batch is built (batches.py).

Determinism and resume: every random choice (which positive, which instruction, which negatives)
is a function of (seed, epoch, example) alone, never of the rank, the worker process or how many
batches were drawn before; the shuffle order and the shards per rank are batches.py's `ShardPlan`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umarvel_ray.data.artefacts import read_negatives, read_teacher_rows
from umarvel_ray.model.losses import stable_id
from umarvel_ray.train.config import LoraRunConfig, TrainConfig

log = logging.getLogger(__name__)

Item = dict[str, Any]
Example = dict[str, Any]


def _rng(seed: int, epoch: int, key: str) -> random.Random:
    """A generator private to (seed, epoch, example key): identical on every rank and process."""
    return random.Random(stable_id(f"{seed}|{epoch}|{key}"))


def _read_jsonl(path: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Rows of a jsonl (the first `limit` when > 0) by the one line reader; a bad row raises FILE:LINE."""
    from umarvel_ray.data.jsonl import read_records

    return read_records(path, limit)


def _text(s: str | None) -> Item:
    return {"text": s, "image": None, "instruction": None}


# ----------------------------------------------------------------------------------------------
# Example sources: len() and example(index, epoch)
# ----------------------------------------------------------------------------------------------


class NLIPairs:
    """Stage 1: SimCSE NLI rows {sent0, sent1, hard_neg}: sent0 -> sent1, hard_neg as the negative."""

    def __init__(self, path: Path, num_negatives: int, limit: int = 0) -> None:
        if num_negatives not in (0, 1):
            raise ValueError("nli data has one hard negative per row: num_negatives must be 0 or 1")
        self.rows = _read_jsonl(path, limit)
        self.k = num_negatives
        for n, r in enumerate(self.rows, 1):
            if not r.get("sent0") or not r.get("sent1") or (self.k and not r.get("hard_neg")):
                raise ValueError(f"{path}: row {n}: needs sent0, sent1" + (" and hard_neg" if self.k else ""))

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, epoch: int) -> Example:
        r = self.rows[index]
        return {
            "query": _text(r["sent0"]),
            "positive": _text(r["sent1"]),
            "negatives": [_text(r["hard_neg"])] * self.k,
        }


class CaptionPairs:
    """Stage 2: CC3M-like rows {caption, img_path}: caption (query) <-> image (candidate)."""

    def __init__(self, path: Path, limit: int = 0) -> None:
        self.rows = _read_jsonl(path, limit)
        for n, r in enumerate(self.rows, 1):
            if not r.get("caption") or not r.get("img_path"):
                raise ValueError(f"{path}: row {n}: needs caption and img_path")

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, epoch: int) -> Example:
        r = self.rows[index]
        return {
            "query": _text(r["caption"]),
            "positive": {"text": None, "image": r["img_path"], "instruction": None},
            "negatives": [],
        }


class _Pool:
    """Candidate lookup by did over an arrow table (compact for multi-million-row pools)."""

    def __init__(self, path: Path) -> None:
        from umarvel_ray.data.mbeir import read_pool

        self.table = read_pool(path, validate=False)
        self.index = {d: i for i, d in enumerate(self.table.column("did").to_pylist())}
        self._txt = self.table.column("txt")
        self._img = self.table.column("img_path")

    def item(self, did: str) -> Item:
        from umarvel_ray.data.model_items import candidate_item

        try:
            i = self.index[did]
        except KeyError:
            raise KeyError(f"candidate {did!r} is not in the pool") from None
        return candidate_item({"txt": self._txt[i].as_py(), "img_path": self._img[i].as_py()})


def read_query_files(paths: Path | Sequence[Path], upsample_min: int = 0) -> list[dict[str, Any]]:
    """Query rows of one or several train files, in file order; a qid in two files raises.

    `upsample_min` > 0 repeats each file's rows `data.tasks.upsample_factors` times (the copies
    carry `copy` = 1, 2, ... so that each draws its own positive and instruction).
    """
    from umarvel_ray.data.mbeir import MBEIRFormatError, read_queries
    from umarvel_ray.data.tasks import upsample_factors

    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    rows_by_file = {f: read_queries(f, validate=True).to_pylist() for f in files}
    seen: dict[str, Path] = {}
    for f, rows in rows_by_file.items():
        for r in rows:
            if r["qid"] in seen:
                raise MBEIRFormatError(f, r["line"], "qid", f"id {r['qid']!r} is also in {seen[r['qid']]}")
            seen[r["qid"]] = f
    factors = upsample_factors({str(f): len(r) for f, r in rows_by_file.items()}, upsample_min)
    out: list[dict[str, Any]] = []
    for f, rows in rows_by_file.items():
        n = factors[str(f)]
        if n > 1:
            log.info("up-sampling %s: %d queries x %d", f, len(rows), n)
        out += [dict(r, copy=c) for c in range(n) for r in rows]
    return out


class MBEIRTrain:
    """Stage 3/4: M-BEIR union train queries; a seeded positive + instruction per query per epoch.

    `split` picks the queries of `holdout_fraction`'s slice (data/holdout.py): `train` (the
    default: held-out queries are left out), `heldout` or `all`.

    With `negatives_path` (stage 4, {qid, neg_dids}) each example carries `num_negatives` mined
    negatives, sampled per epoch without replacement (cycled when a list is shorter); labelled
    positives are never used as negatives, and queries without any negative are dropped (logged).
    """

    def __init__(
        self,
        queries_path: Path | Sequence[Path],
        pool_path: Path,
        instructions_path: Path,
        seed: int,
        negatives_path: Path | None = None,
        num_negatives: int = 0,
        limit: int = 0,
        upsample_min: int = 0,
        holdout_fraction: float = 0.0,
        split: str = "train",
    ) -> None:
        from umarvel_ray.data.holdout import split_queries
        from umarvel_ray.data.instructions import read_instructions

        self.queries = split_queries(read_query_files(queries_path, upsample_min), holdout_fraction, split)
        if limit:
            self.queries = self.queries[:limit]
        self.pool = _Pool(pool_path)
        self.instructions = read_instructions(instructions_path)
        self.seed, self.k = seed, num_negatives
        self.queries = [q for q in self.queries if q["pos_cand_list"]]
        self.negatives: dict[str, list[str]] = {}
        if num_negatives > 0:
            if negatives_path is None:
                raise ValueError("num_negatives > 0 needs negatives_file (mined {qid, neg_dids} jsonl)")
            self.negatives.update(read_negatives(negatives_path))
            before = len(self.queries)
            for q in self.queries:
                pos = set(q["pos_cand_list"])
                self.negatives[q["qid"]] = [d for d in self.negatives.get(q["qid"], []) if d not in pos]
            self.queries = [q for q in self.queries if self.negatives[q["qid"]]]
            if len(self.queries) < before:
                log.warning(
                    "%d of %d queries have no mined negative and are left out",
                    before - len(self.queries),
                    before,
                )

    def __len__(self) -> int:
        return len(self.queries)

    def example(self, index: int, epoch: int) -> Example:
        from umarvel_ray.data.model_items import query_item

        q = self.queries[index]
        rng = _rng(self.seed, epoch, q["qid"] + (f"#{q['copy']}" if q.get("copy") else ""))
        pos = rng.choice(q["pos_cand_list"])
        negs: list[str] = []
        if self.k:
            pool = self.negatives[q["qid"]]
            order = rng.sample(pool, len(pool))
            negs = [order[i % len(order)] for i in range(self.k)]
        return {
            "query": query_item(q, self.instructions, rng=rng),
            "positive": self.pool.item(pos),
            "negatives": [self.pool.item(d) for d in negs],
        }


class DistillTeacher:
    """Stage 5: teacher rows {qid, candidates: [did], scores: [float]} over M-BEIR train queries."""

    def __init__(
        self,
        teacher_path: Path,
        queries_path: Path | Sequence[Path],
        pool_path: Path,
        instructions_path: Path,
        seed: int,
        num_candidates: int,
        limit: int = 0,
    ) -> None:
        from umarvel_ray.data.instructions import read_instructions

        queries = {q["qid"]: q for q in read_query_files(queries_path)}
        self.rows = []
        for n, r in enumerate(read_teacher_rows(teacher_path, limit), 1):
            qid = str(r.get("qid"))
            cands, scores = r["candidates"], r["scores"]
            if qid not in queries:
                raise ValueError(f"{teacher_path}: row {n}: unknown qid {qid!r}")
            self.rows.append(
                (
                    queries[qid],
                    [str(c) for c in cands][:num_candidates],
                    [float(s) for s in scores][:num_candidates],
                )
            )
        self.pool = _Pool(pool_path)
        self.instructions = read_instructions(instructions_path)
        self.seed, self.m = seed, num_candidates

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, epoch: int) -> Example:
        from umarvel_ray.data.model_items import query_item

        q, cands, scores = self.rows[index]
        rng = _rng(self.seed, epoch, q["qid"])
        return {
            "query": query_item(q, self.instructions, rng=rng),
            "candidates": [self.pool.item(d) for d in cands],
            "scores": scores,
        }


def mbeir_train_inputs(cfg: LoraRunConfig) -> tuple[list[Path], Path]:
    """Train query files and pool of a stage 3-5 (or reranker) config: `train_file` / `pool_file`
    when they exist, else the per-task train files and the union of the local pools
    (`data.tasks.resolve_train_inputs`; the merged pool is cached under the stage directory)."""
    from umarvel_ray.data.tasks import resolve_train_inputs

    queries, pool, _ = resolve_train_inputs(
        cfg.data_root or ".", cfg.data_path(cfg.train_file), cfg.data_path(cfg.pool_file), cfg.stage_dir / "inputs"
    )
    if getattr(cfg, "upsample_min", 0) and queries == [cfg.data_path(cfg.train_file)]:
        raise ValueError(
            f"upsample_min applies to per-task train files; {queries[0]} is a union file (M-BEIR's is "
            "already up-sampled): set upsample_min=0"
        )
    return queries, pool


def build_source(cfg: TrainConfig) -> NLIPairs | CaptionPairs | MBEIRTrain | DistillTeacher:
    """The stage's example source from its config."""
    limit = cfg.max_examples
    if cfg.data_kind == "nli":
        return NLIPairs(cfg.data_path(cfg.train_file), cfg.num_negatives, limit)
    if cfg.data_kind == "caption":
        if cfg.num_negatives:
            raise ValueError("caption pairs have no hard negatives: set num_negatives=0")
        return CaptionPairs(cfg.data_path(cfg.train_file), limit)
    queries, pool = mbeir_train_inputs(cfg)
    common = (queries, pool, cfg.data_path(cfg.instructions_file))
    if cfg.data_kind == "mbeir":
        negs = cfg.data_path(cfg.negatives_file) if cfg.negatives_file else None
        return MBEIRTrain(
            *common,
            seed=cfg.seed,
            negatives_path=negs,
            num_negatives=cfg.num_negatives,
            limit=limit,
            upsample_min=cfg.upsample_min,
            holdout_fraction=cfg.holdout_fraction,
        )
    if not cfg.teacher_file:
        raise ValueError("distillation needs teacher_file ({qid, candidates, scores} jsonl)")
    return DistillTeacher(
        cfg.data_path(cfg.teacher_file),
        *common,
        seed=cfg.seed,
        num_candidates=cfg.num_candidates,
        limit=limit,
    )
