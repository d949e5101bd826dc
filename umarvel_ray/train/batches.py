"""This rank's batches: the sharding plan, image decoding, GradCache chunks and collation.

Determinism and resume: epoch `e` visits the seeded permutation `perm(seed, e)`; rank `r` of `W`
takes `perm[r::W]` and its batch `s` is rows `[s*B, (s+1)*B)` of that. So the global step number
alone fixes every rank's next batch: resuming at step g replays nothing and skips nothing (as long
as workers and per-device batch are unchanged; a change is refused at resume). What each example
holds in an epoch is the example source's business (data.py), a function of (seed, epoch, example).
Images are decoded only when a batch is built, inside the DataLoader workers when
`loader_workers > 0`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umarvel_ray.model.losses import split_chunks, stable_id
from umarvel_ray.train.data import Example, Item

log = logging.getLogger(__name__)


def item_id(item: Item) -> int:
    """Content id used to mask false negatives: same text + image (+ instruction) = same item."""
    return stable_id(
        f"{item.get('text') or ''}\x1f{item.get('image') or ''}\x1f{item.get('instruction') or ''}"
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
