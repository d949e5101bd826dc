"""Re-ranker training: Yes/No pair dataset (labels, shards, determinism) and a 2-worker Ray run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umarvel_ray.config import resolve_paths
from umarvel_ray.data.model_items import candidate_item
from umarvel_ray.layout import STEPS_FILE
from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
from umarvel_ray.train.batches import ShardPlan
from umarvel_ray.train.launch import run_reranker_training
from umarvel_ray.train.reranker import RerankerTrainConfig, RerankPairs

TRAIN = "query/train/mbeir_union_up_train.jsonl"
POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_negatives(data: Path, out: Path, n: int = 3, limit: int = 0) -> dict[str, list[str]]:
    """Hand-'mined' negatives: for each train query the first n pool dids that are not positives."""
    pool = [r["did"] for r in _rows(data / POOL)]
    negs: dict[str, list[str]] = {}
    for i, q in enumerate(_rows(data / TRAIN)):
        if limit and i >= limit:
            break
        pos = set(q["pos_cand_list"])
        start = (i * 7) % len(pool)
        negs[q["qid"]] = [d for d in pool[start:] + pool[:start] if d not in pos][:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"qid": k, "neg_dids": v}) + "\n" for k, v in negs.items()))
    return negs


def _cfg(tmp_path: Path, data: Path, model: str = "unused", **kw) -> RerankerTrainConfig:
    base = dict(
        model=model,
        run_dir=str(tmp_path / "run"),
        data_root=str(data),
        negatives_file="{run_dir}/negatives/negatives.jsonl",
        max_examples=12,
    )
    base.update(kw)
    return resolve_paths(RerankerTrainConfig(**base))  # as load_config gives it to the library


def test_pairs_labels_shards_determinism(tmp_path, toy_mbeir_dir):
    cfg = _cfg(tmp_path, toy_mbeir_dir, negatives_per_positive=2)
    negs = _write_negatives(toy_mbeir_dir, cfg.negatives_path())
    positives = {q["qid"]: set(q["pos_cand_list"]) for q in _rows(toy_mbeir_dir / TRAIN)}
    pairs = RerankPairs(cfg)
    assert len(pairs) == 3 * len(pairs.queries) == 36
    pool = {r["did"]: r for r in _rows(toy_mbeir_dir / POOL)}

    def did_of(item: dict) -> set[str]:
        return {d for d, r in pool.items() if candidate_item(r) == item}

    n_yes = 0
    for i in range(len(pairs)):
        q, c, y = pairs.pair(i, epoch=0)
        qid = pairs.qid(i)
        assert y == (i % 3 == 0)
        n_yes += y
        assert q["instruction"] and (q["text"] or q["image"])
        cands = did_of(c)
        if y:
            assert cands & positives[qid]
        else:  # a No pair's candidate is one of this query's mined negatives, never a positive
            assert cands & set(negs[qid]) and not cands <= positives[qid]
        # deterministic: same (index, epoch) -> same pair
        assert pairs.pair(i, 0) == (q, c, y)
    assert n_yes == len(pairs.queries)
    # both negatives of a query in one epoch are distinct mined candidates
    q0_negs = [pairs.pair(j, 0)[1] for j in (1, 2)]
    assert q0_negs[0] != q0_negs[1]

    # shards: disjoint across ranks, covering whole global batches, deterministic per (seed, epoch)
    world, b = 2, 4
    plans = [ShardPlan(len(pairs), world, r, b, cfg.seed) for r in range(world)]
    for epoch in (0, 1):
        seen = [np.concatenate([p.indices(epoch, s) for s in range(p.steps_per_epoch)]) for p in plans]
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == plans[0].steps_per_epoch * world * b
    assert np.array_equal(plans[0].order(0), ShardPlan(len(pairs), world, 0, b, cfg.seed).order(0))
    assert not np.array_equal(plans[0].order(0), plans[0].order(1))
    # a different seed reshuffles
    assert not np.array_equal(plans[0].order(0), ShardPlan(len(pairs), world, 0, b, cfg.seed + 1).order(0))


def test_missing_negatives_is_an_error(tmp_path, toy_mbeir_dir):
    with pytest.raises(FileNotFoundError, match="mined negatives"):
        RerankPairs(_cfg(tmp_path, toy_mbeir_dir))


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_ray_deepspeed_run(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    from umarvel_ray.model.reranker import Reranker

    cfg = _cfg(
        tmp_path,
        toy_mbeir_dir,
        model=str(tiny_model_dir),
        lora_r=4,
        lora_alpha=8,
        lr=2e-3,
        per_device_batch=4,
        max_examples=4,  # 8 pairs = one global batch: the same small batch every step
        max_steps=6,
        log_every=1,
        save_every=3,
        workers=2,
        cpus_per_worker=0.5,
        max_failures=0,
        zero_stage=1,
    )
    _write_negatives(toy_mbeir_dir, cfg.negatives_path())
    out = run_reranker_training(cfg)
    assert out == cfg.model_dir and (out / "config.json").is_file()

    steps = [json.loads(line) for line in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    assert summary["total_steps"] == 6 and {"loss", "accuracy", "samples_per_s"} <= set(summary["last"])
    assert 0.0 <= summary["last"]["accuracy"] <= 1.0
    assert (
        sorted(p.name for p in (Path(cfg.run_dir) / "ray" / "reranker").glob("step_*"))[-1] == "step_00000006"
    )

    pairs = RerankPairs(cfg)
    batch = [pairs.pair(i, 0) for i in range(4)]
    from umarvel_ray.data.images import load_image

    def dec(item: dict) -> dict:
        return {**item, "image": load_image(toy_mbeir_dir, item["image"]) if item["image"] else None}

    items = [(dec(q), dec(c)) for q, c, _ in batch]
    trained = Reranker.load(out).score(items)
    base = Reranker.load(tiny_model_dir).score(items)
    assert trained.shape == (4,) and np.all((trained >= 0) & (trained <= 1))
    assert not np.allclose(trained, base, atol=1e-4)

    # a second submission finds the model and skips training
    assert run_reranker_training(cfg) == out
