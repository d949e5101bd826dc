"""Stages 4 and 5 through the real training loop (Ray Train, 2 gloo workers, DeepSpeed), and
stage 5's teacher gate.

Stage 4 trains on mined negatives, stage 5 on teacher scores; each must change the model it
starts from. A teacher whose fused ranking does not beat cos must not be distilled: the stage is
finished without starting Ray, keeps its starting model and says why.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from umarvel_ray.config import ConfigError
from umarvel_ray.data.artefacts import write_negatives, write_teacher, write_teacher_quality
from umarvel_ray.layout import STEPS_FILE, TRAIN_SUMMARY_FILE
from umarvel_ray.teacher.quality import teacher_quality
from umarvel_ray.train.config import TrainConfig
from umarvel_ray.train.gate import skipped_reason
from umarvel_ray.train.launch import run_stage, stage_done


def _train_rows(data: Path, n: int) -> tuple[list[dict], list[str]]:
    rows = [json.loads(x) for x in (data / "query/train/mbeir_union_up_train.jsonl").read_text().splitlines()]
    pool = [json.loads(x)["did"] for x in (data / "cand_pool/global/mbeir_union_train_cand_pool.jsonl").open()]
    return rows[:n], pool


def _cfg(tmp_path: Path, model: Path, data: Path, stage: str, **kw) -> TrainConfig:
    base = dict(
        stage=stage,
        run_dir=str(tmp_path / "run"),
        model=str(model),
        data_root=str(data),
        lora_r=4,
        lora_alpha=8,
        lr=1e-3,
        max_steps=2,
        save_every=2,
        log_every=1,
        workers=2,
        cpus_per_worker=0.5,
        max_failures=0,
        zero_stage=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weight(model_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    (name,) = [k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight") and "visual" not in k]
    return tensors[name]


def _teacher(tmp_path: Path, data: Path, n: int = 8, m: int = 4) -> tuple[Path, list[dict]]:
    """A teacher.jsonl over the first `n` train queries: the positive plus m-1 other candidates."""
    rows, pool = _train_rows(data, n)
    rng = random.Random(0)
    records = []
    for r in rows:
        pos = r["pos_cand_list"][0]
        others = [d for d in rng.sample(pool, m + 4) if d not in r["pos_cand_list"]][: m - 1]
        cands = [*others[:1], pos, *others[1:]]  # cos puts a negative first
        cos = [0.9, 0.8, 0.7, 0.6][:m]
        p_yes = [0.1 if c != pos else 0.9 for c in cands]
        records.append(
            {"qid": r["qid"], "task": "t", "weight": 1.0, "candidates": cands, "cos": cos, "p_yes": p_yes,
             "scores": [c + p for c, p in zip(cos, p_yes, strict=True)]}
        )  # fmt: skip
    out = tmp_path / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    return write_teacher(out, records), records


@pytest.mark.ray
def test_stage4_trains_on_mined_negatives(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    rows, pool = _train_rows(toy_mbeir_dir, 32)
    rng = random.Random(1)
    negs = [(r["qid"], [d for d in rng.sample(pool, 6) if d not in r["pos_cand_list"]][:3]) for r in rows]
    write_negatives(tmp_path / "neg", [{"qid": q, "neg_dids": n, "n_candidates": 3} for q, n in negs], [])
    cfg = _cfg(
        tmp_path, tiny_model_dir, toy_mbeir_dir, "stage4", data_kind="mbeir", objective="infonce",
        negatives_file=str(tmp_path / "neg" / "negatives.jsonl"), num_negatives=2, per_device_batch=4,
        max_examples=32,
    )  # fmt: skip
    out = run_stage(cfg)
    assert stage_done(cfg)
    steps = [json.loads(x) for x in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert not torch.equal(_weight(out), _weight(tiny_model_dir))


@pytest.mark.ray
def test_stage5_distils_and_logs_both_entropies(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    teacher, records = _teacher(tmp_path, toy_mbeir_dir)
    rows = _train_rows(toy_mbeir_dir, 8)[0]
    positives = {r["qid"]: frozenset(r["pos_cand_list"]) for r in rows}
    quality = teacher_quality(records, positives, held_out=True)
    assert quality["fusion_beats_cos"]  # the positive is second by cos, first once fused
    write_teacher_quality(teacher.parent, quality)
    cfg = _cfg(
        tmp_path, tiny_model_dir, toy_mbeir_dir, "stage5", data_kind="distill", objective="distill",
        teacher_file=str(teacher), num_candidates=4, per_device_batch=2,
    )  # fmt: skip
    out = run_stage(cfg)
    assert skipped_reason(cfg.stage_dir) is None
    steps = [json.loads(x) for x in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:  # both distributions are over 4 candidates: entropies in (0, ln 4]
        assert 0.0 < s["teacher_entropy"] <= 1.3863 and 0.0 < s["student_entropy"] <= 1.3863
    assert not torch.equal(_weight(out), _weight(tiny_model_dir))


def test_gate_skips_stage5_when_fusion_does_not_beat_cos(tmp_path, tiny_model_dir, toy_mbeir_dir, caplog):
    teacher, records = _teacher(tmp_path, toy_mbeir_dir)
    for r in records:  # an uninformative re-ranker: every candidate the same P(Yes)
        r["p_yes"] = [0.5] * len(r["candidates"])
        r["scores"] = [c + 0.5 for c in r["cos"]]
    rows = _train_rows(toy_mbeir_dir, 8)[0]
    quality = teacher_quality(records, {r["qid"]: frozenset(r["pos_cand_list"]) for r in rows}, held_out=True)
    assert not quality["fusion_beats_cos"] and quality["fused"] == quality["cos"]
    write_teacher_quality(teacher.parent, quality)
    cfg = _cfg(
        tmp_path, tiny_model_dir, toy_mbeir_dir, "stage5", data_kind="distill", objective="distill",
        teacher_file=str(teacher), num_candidates=4, per_device_batch=2,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="umarvel_ray.train.gate"):
        out = run_stage(cfg)  # no Ray cluster given: the gate decides before any start-up
    assert "stage5 skipped: the teacher's fused ranking does not beat cos alone" in caplog.text
    assert stage_done(cfg) and not (Path(cfg.run_dir) / "ray").exists()
    assert torch.equal(_weight(out), _weight(tiny_model_dir))  # its model is its starting model
    summary = json.loads((cfg.stage_dir / TRAIN_SUMMARY_FILE).read_text())
    assert summary["skipped"].startswith("the teacher's fused ranking does not beat cos alone (MRR@K 0.5000")
    assert run_stage(cfg) == out  # a finished (skipped) stage stays finished


def test_gate_needs_the_teacher_quality(tmp_path, tiny_model_dir, toy_mbeir_dir):
    teacher, _ = _teacher(tmp_path, toy_mbeir_dir)
    cfg = _cfg(
        tmp_path, tiny_model_dir, toy_mbeir_dir, "stage5", data_kind="distill", objective="distill",
        teacher_file=str(teacher), num_candidates=4,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"no teacher_quality.json beside it.* stage5.teacher_gate=false"):
        run_stage(cfg)


def test_teacher_quality_arithmetic():
    records = [
        # positive "b" is 2nd by cos and 1st fused; pairs (b>a), (b>c): both won
        {"qid": "q1", "candidates": ["a", "b", "c"], "cos": [0.9, 0.8, 0.1], "p_yes": [0.2, 0.9, 0.1],
         "scores": [1.1, 1.7, 0.2]},
        # positive "z" 3rd by cos, stays 3rd fused; P(Yes) loses to x, beats y: 1 of 2 pairs
        {"qid": "q2", "candidates": ["x", "y", "z"], "cos": [0.9, 0.5, 0.4], "p_yes": [0.6, 0.1, 0.3],
         "scores": [1.5, 0.6, 0.7]},
        # no positive in the list: 0 for both rankings, no pairs
        {"qid": "q3", "candidates": ["m"], "cos": [0.3], "p_yes": [0.5], "scores": [0.8]},
    ]  # fmt: skip
    q = teacher_quality(records, {"q1": {"b"}, "q2": {"z"}, "q3": {"nope"}}, held_out=False)
    assert q["queries"] == 3 and q["queries_with_positive"] == 2
    assert q["cos"] == {"mrr": round((1 / 2 + 1 / 3) / 3, 6), "hit_at_1": 0.0}
    assert q["fused"] == {"mrr": round((1 + 1 / 2) / 3, 6), "hit_at_1": round(1 / 3, 6)}
    assert q["p_yes"]["pairwise_accuracy"] == 0.75 and q["p_yes"]["pairs"] == 4
    assert q["fusion_beats_cos"] is True
