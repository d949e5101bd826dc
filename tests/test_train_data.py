"""Training data: per-epoch determinism, disjoint rank shards, resume positions, stage sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from umarvel_ray.train.batches import BatchBuilder, ShardPlan, item_id, iterate_batches
from umarvel_ray.train.config import TrainConfig
from umarvel_ray.train.data import CaptionPairs, DistillTeacher, MBEIRTrain, NLIPairs, build_source


def _plan(rank: int, world: int = 2, n: int = 23, b: int = 3) -> ShardPlan:
    return ShardPlan(n_examples=n, world=world, rank=rank, per_device_batch=b, seed=5)


def test_shards_are_disjoint_and_epochs_reshuffle():
    plans = [_plan(r) for r in range(2)]
    assert plans[0].steps_per_epoch == 23 // 6 == 3
    for epoch in (0, 1):
        seen = [i for p in plans for s in range(p.steps_per_epoch) for i in p.indices(epoch, s).tolist()]
        assert len(seen) == len(set(seen)) == 18  # disjoint, full batches only
    e0 = [plans[0].indices(0, s).tolist() for s in range(3)]
    e1 = [plans[0].indices(1, s).tolist() for s in range(3)]
    assert e0 != e1
    assert e0 == [_plan(0).indices(0, s).tolist() for s in range(3)]  # deterministic
    assert plans[0].position(7) == (2, 1)
    assert plans[0].total_steps(epochs=1.5, max_steps=0) == 5 and plans[0].total_steps(2.0, 4) == 4


class _Range:
    """A source whose examples are their own index (text items), to follow the data order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def example(self, index: int, epoch: int) -> dict:
        t = {"text": f"q{index}", "image": None, "instruction": None}
        return {"query": t, "positive": {**t, "text": f"p{index}"}, "negatives": []}


def _collate(items: list[dict], is_query: bool) -> dict[str, torch.Tensor]:
    return {"n": torch.tensor([int(it["text"][1:]) for it in items])}


def test_resume_neither_repeats_nor_skips(tmp_path):
    plan = _plan(1, n=40, b=4)  # 5 steps per epoch
    builder = BatchBuilder(_Range(40), _collate, tmp_path)
    full = [(b.global_step, b.indices) for b in iterate_batches(plan, builder, 0, 12)]
    assert [g for g, _ in full] == list(range(12))
    first, rest = full[:7], [(b.global_step, b.indices) for b in iterate_batches(plan, builder, 7, 12)]
    assert first + rest == full
    # Collated chunks follow the batch's indices; GradCache micro-batches split them in order.
    batch = next(iterate_batches(plan, BatchBuilder(_Range(40), _collate, tmp_path, micro_batch=3), 0, 1))
    assert [c["n"].tolist() for c in batch.chunks["query"]] == [batch.indices[:3], batch.indices[3:]]
    assert batch.pos_ids.tolist() == [item_id({"text": f"p{i}"}) for i in batch.indices]


def test_plan_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        next(iterate_batches(_plan(0, n=5, b=3), BatchBuilder(_Range(5), _collate, tmp_path), 0, 1))


def test_nli_and_caption_sources(toy_mbeir_dir):
    nli = NLIPairs(toy_mbeir_dir / "pretrain/nli_pairs.jsonl", num_negatives=1, limit=10)
    ex = nli.example(3, 0)
    assert len(nli) == 10 and ex["query"]["text"] and len(ex["negatives"]) == 1
    assert ex["negatives"][0]["text"] != ex["positive"]["text"]
    with pytest.raises(ValueError, match="num_negatives"):
        NLIPairs(toy_mbeir_dir / "pretrain/nli_pairs.jsonl", num_negatives=2)
    cap = CaptionPairs(toy_mbeir_dir / "pretrain/caption_pairs.jsonl", limit=5)
    ex = cap.example(0, 0)
    assert ex["query"]["image"] is None and ex["positive"]["image"].endswith(".png")
    assert (toy_mbeir_dir / ex["positive"]["image"]).is_file()


def _mbeir_cfg(root: Path, **kw) -> TrainConfig:
    return TrainConfig(data_kind="mbeir", data_root=str(root), **kw)


def test_mbeir_instruction_and_positive_sampling_is_seeded_per_epoch(toy_mbeir_dir):
    src = build_source(_mbeir_cfg(toy_mbeir_dir, max_examples=300))
    assert isinstance(src, MBEIRTrain) and len(src) == 300
    multi = [i for i, q in enumerate(src.queries) if len(q["pos_cand_list"]) > 1] or [0]
    a = [src.example(i, 0) for i in range(len(src))]
    assert a == [src.example(i, 0) for i in range(len(src))]  # same (seed, epoch) -> same example
    b = [src.example(i, 1) for i in range(len(src))]
    instr_changed = sum(
        x["query"]["instruction"] != y["query"]["instruction"] for x, y in zip(a, b, strict=True)
    )
    assert instr_changed > 0  # instructions are re-drawn each epoch
    for i in multi[:5]:
        q = src.queries[i]
        pos_texts = {json.dumps(src.pool.item(d), sort_keys=True) for d in q["pos_cand_list"]}
        assert json.dumps(a[i]["positive"], sort_keys=True) in pos_texts
    assert all(x["query"]["instruction"] for x in a) and all(x["negatives"] == [] for x in a)


def test_mbeir_hard_negatives_and_teacher(toy_mbeir_dir, tmp_path):
    base = MBEIRTrain(
        toy_mbeir_dir / "query/train/mbeir_union_up_train.jsonl",
        toy_mbeir_dir / "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
        toy_mbeir_dir / "instructions/query_instructions.tsv",
        seed=1,
        limit=20,
    )
    dids = list(base.pool.index)
    negs = tmp_path / "negs.jsonl"
    with open(negs, "w") as f:
        for k, q in enumerate(base.queries):
            if k == 0:
                continue  # a query without mined negatives is left out
            f.write(
                json.dumps({"qid": q["qid"], "neg_dids": [q["pos_cand_list"][0], *dids[k : k + 3]]}) + "\n"
            )
    cfg = _mbeir_cfg(toy_mbeir_dir, max_examples=20, num_negatives=5, negatives_file=str(negs), seed=1)
    src = build_source(cfg)
    assert len(src) == len(base) - 1
    ex = src.example(0, 0)
    q = src.queries[0]
    allowed = [json.dumps(src.pool.item(d), sort_keys=True) for d in src.negatives[q["qid"]]]
    assert len(ex["negatives"]) == 5 and len(allowed) == 3  # the labelled positive was removed
    assert all(json.dumps(n, sort_keys=True) in allowed for n in ex["negatives"])
    assert ex["negatives"] != src.example(0, 1)["negatives"] or len(set(allowed)) == 1

    teacher = tmp_path / "teacher.jsonl"
    with open(teacher, "w") as f:
        for k, q in enumerate(base.queries[:4]):
            f.write(
                json.dumps({"qid": q["qid"], "candidates": dids[k : k + 3 + k], "scores": [1.0] * (3 + k)})
                + "\n"
            )
    tcfg = TrainConfig(
        data_kind="distill",
        objective="distill",
        data_root=str(toy_mbeir_dir),
        teacher_file=str(teacher),
        num_candidates=4,
    )
    tsrc = build_source(tcfg)
    assert isinstance(tsrc, DistillTeacher) and len(tsrc) == 4
    assert [len(tsrc.example(i, 0)["candidates"]) for i in range(4)] == [3, 4, 4, 4]


def test_batches_decode_images_and_collate_with_the_embedder(toy_mbeir_dir, tiny_model_dir, tmp_path):
    from umarvel_ray.model.embedder import Embedder, EmbedderConfig

    emb = Embedder.build(EmbedderConfig(model=str(tiny_model_dir)))
    cfg = _mbeir_cfg(toy_mbeir_dir, max_examples=40)
    src = build_source(cfg)
    builder = BatchBuilder(src, emb.collate, toy_mbeir_dir, micro_batch=2)
    plan = ShardPlan(len(src), 1, 0, 4, cfg.seed)
    batch = next(iterate_batches(plan, builder, 0, 1))
    assert batch.size == 4 and len(batch.chunks["query"]) == len(batch.chunks["positive"]) == 2
    with torch.no_grad():
        e = torch.cat([emb(c) for c in batch.chunks["positive"]])
    assert e.shape == (4, emb.dim) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-4)
    # A missing image drops that example (counted) instead of failing the step.
    bad = tmp_path / "caps.jsonl"
    bad.write_text(
        json.dumps({"caption": "A red square.", "img_path": "nope.png"})
        + "\n"
        + "".join(
            json.dumps({"caption": f"cap {i}", "img_path": r["img_path"]}) + "\n"
            for i, r in enumerate(CaptionPairs(toy_mbeir_dir / "pretrain/caption_pairs.jsonl", 3).rows)
        )
    )
    capb = BatchBuilder(CaptionPairs(bad), emb.collate, toy_mbeir_dir).build([0, 1, 2, 3], 0, 0, 0)
    assert capb.dropped == 1 and capb.indices == [1, 2, 3] and "pixel_patches" in capb.chunks["positive"][0]
    assert np.unique(capb.pos_ids.numpy()).size == 3
