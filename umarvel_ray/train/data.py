"""Training examples for the five stages, sharded per rank, deterministic per (seed, epoch, step).

An *example* is `{"query": item, "positive": item, "negatives": [item, ...]}` (or, for distillation,
`{"query": item, "candidates": [item, ...], "scores": [...]}`) whose items hold image *paths*
relative to the data root; images are decoded only when a batch is built (`load_image`), inside the
DataLoader workers when `loader_workers > 0`.

Determinism and resume: every random choice (shuffle order, which positive, which instruction, which
negatives) is a function of (seed, epoch, example) alone, never of the rank, the worker process or
how many batches were drawn before. Epoch `e` visits `perm(seed, e)`; rank `r` of `W` takes
`perm[r::W]` and its batch `s` is rows `[s*B, (s+1)*B)` of that. So the global step number alone
fixes every rank's next batch: resuming at step g replays nothing and skips nothing (as long as
workers and per-device batch are unchanged; a change is refused at resume).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umarvel_ray.data.artefacts import read_negatives, read_teacher_rows
from umarvel_ray.model.losses import split_chunks, stable_id
from umarvel_ray.train.stages import TrainConfig

log = logging.getLogger(__name__)

Item = dict[str, Any]
Example = dict[str, Any]


def _rng(seed: int, epoch: int, key: str) -> random.Random:
    """A generator private to (seed, epoch, example key): identical on every rank and process."""
    return random.Random(stable_id(f"{seed}|{epoch}|{key}"))


def item_id(item: Item) -> int:
    """Content id used to mask false negatives: same text + image (+ instruction) = same item."""
    return stable_id(
        f"{item.get('text') or ''}\x1f{item.get('image') or ''}\x1f{item.get('instruction') or ''}"
    )


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
        from umarvel_ray.data.mbeir import candidate_item

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
    ) -> None:
        from umarvel_ray.data.mbeir import read_instructions

        self.queries = read_query_files(queries_path, upsample_min)
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
        from umarvel_ray.data.mbeir import query_item

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
        from umarvel_ray.data.mbeir import read_instructions

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
        from umarvel_ray.data.mbeir import query_item

        q, cands, scores = self.rows[index]
        rng = _rng(self.seed, epoch, q["qid"])
        return {
            "query": query_item(q, self.instructions, rng=rng),
            "candidates": [self.pool.item(d) for d in cands],
            "scores": scores,
        }


def mbeir_train_inputs(cfg: Any) -> tuple[list[Path], Path]:
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


# ----------------------------------------------------------------------------------------------
# Sharding plan and position
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which examples rank `rank` trains on at (epoch, step); see the module docstring."""

    n_examples: int
    world: int
    rank: int
    per_device_batch: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.world * self.per_device_batch

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the remainder of each shuffled epoch is dropped)."""
        return self.n_examples // self.global_batch

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of the batch that global step `global_step` (0-based) trains on."""
        return divmod(global_step, self.steps_per_epoch)

    def indices(self, epoch: int, step: int) -> np.ndarray:
        mine = self.order(epoch)[self.rank :: self.world]
        b = self.per_device_batch
        return mine[step * b : (step + 1) * b]


# ----------------------------------------------------------------------------------------------
# Batches: decode images, split into GradCache chunks, collate
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One rank's step input: collated chunks per role plus ids/teacher tensors for the loss."""

    global_step: int
    epoch: int
    step: int
    indices: list[int]
    chunks: dict[str, list[dict[str, torch.Tensor]]]
    pos_ids: torch.Tensor | None = None
    neg_ids: torch.Tensor | None = None
    query_ids: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    cand_mask: torch.Tensor | None = None
    dropped: int = 0

    @property
    def size(self) -> int:
        return len(self.indices)


class BatchBuilder:
    """Turns example indices into a `Batch` (picklable: runs inside DataLoader workers)."""

    def __init__(
        self,
        source: Any,
        collate: Callable[[list[Item], bool], dict[str, torch.Tensor]],
        image_root: str | Path,
        micro_batch: int = 0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.source, self.collate, self.root = source, collate, Path(image_root)
        self.micro_batch = micro_batch
        self.budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}

    def _decode(self, item: Item) -> Item:
        from umarvel_ray.data.images import load_image

        if item.get("image") is None or not isinstance(item["image"], str):
            return item
        return {**item, "image": load_image(self.root, item["image"], **self.budget)}

    def _examples(self, indices: list[int], epoch: int) -> tuple[list[Example], list[int], int]:
        from umarvel_ray.data.images import ImageDecodeError

        out, kept, dropped = [], [], 0
        for i in indices:
            ex = self.source.example(int(i), epoch)
            try:
                dec = {k: self._decode(v) if k in ("query", "positive") else v for k, v in ex.items()}
                for k in ("negatives", "candidates"):
                    if k in ex:
                        dec[k] = [self._decode(x) for x in ex[k]]
            except ImageDecodeError as e:
                dropped += 1
                log.warning("dropping training example %d (epoch %d): %s", i, epoch, e.reason)
                continue
            dec["_raw"] = ex
            out.append(dec)
            kept.append(int(i))
        return out, kept, dropped

    def build(self, indices: list[int], epoch: int, step: int, global_step: int) -> Batch:
        exs, kept, dropped = self._examples(indices, epoch)
        if not exs:
            raise RuntimeError(f"every example of epoch {epoch} step {step} failed to decode")
        rows = split_chunks(len(exs), self.micro_batch or len(exs))
        batch = Batch(global_step, epoch, step, kept, chunks={}, dropped=dropped)
        batch.chunks["query"] = [self.collate([e["query"] for e in exs[s]], True) for s in rows]
        batch.query_ids = torch.tensor([item_id(e["_raw"]["query"]) for e in exs], dtype=torch.long)
        if "candidates" in exs[0]:
            m = max(len(e["candidates"]) for e in exs)
            cands, mask = [], []
            for e in exs:
                c = e["candidates"]
                cands.append(c + [c[-1]] * (m - len(c)))
                mask.append([True] * len(c) + [False] * (m - len(c)))
            batch.chunks["candidates"] = [
                self.collate([c for cs in cands[s] for c in cs], False) for s in rows
            ]
            scores = [e["scores"] + [0.0] * (m - len(e["scores"])) for e in exs]
            batch.scores = torch.tensor(scores, dtype=torch.float32)
            batch.cand_mask = torch.tensor(mask, dtype=torch.bool)
            return batch
        batch.chunks["positive"] = [self.collate([e["positive"] for e in exs[s]], False) for s in rows]
        batch.pos_ids = torch.tensor([item_id(e["_raw"]["positive"]) for e in exs], dtype=torch.long)
        if exs[0]["negatives"]:
            batch.chunks["negatives"] = [
                self.collate([n for e in exs[s] for n in e["negatives"]], False) for s in rows
            ]
            batch.neg_ids = torch.tensor(
                [item_id(n) for e in exs for n in e["_raw"]["negatives"]], dtype=torch.long
            )
        return batch


class EpochBatches(torch.utils.data.Dataset):
    """Map-style dataset of this rank's batches of one epoch, from `start_step` on."""

    def __init__(
        self, plan: ShardPlan, builder: BatchBuilder, epoch: int, start_step: int, stop_step: int
    ) -> None:
        self.plan, self.builder, self.epoch = plan, builder, epoch
        self.start, self.stop = start_step, stop_step

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> Batch:
        step = self.start + i
        g = self.epoch * self.plan.steps_per_epoch + step
        return self.builder.build(self.plan.indices(self.epoch, step).tolist(), self.epoch, step, g)


def _identity(batch: Batch) -> Batch:
    return batch


def iterate_batches(
    plan: ShardPlan, builder: BatchBuilder, start_global_step: int, total_steps: int, loader_workers: int = 0
) -> Iterator[Batch]:
    """This rank's batches for global steps [start_global_step, total_steps), epoch by epoch."""
    if plan.steps_per_epoch < 1:
        raise ValueError(
            f"{plan.n_examples} examples cannot fill one global batch of {plan.global_batch} "
            f"({plan.world} workers x {plan.per_device_batch}); lower per_device_batch or workers"
        )
    g = start_global_step
    while g < total_steps:
        epoch, step = plan.position(g)
        stop = min(plan.steps_per_epoch, step + (total_steps - g))
        ds = EpochBatches(plan, builder, epoch, step, stop)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=loader_workers,
            collate_fn=_identity,
            persistent_workers=False,
            prefetch_factor=2 if loader_workers else None,
        )
        for batch in loader:
            yield batch
            g += 1
