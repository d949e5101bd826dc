"""ZeRO-3 end to end on 2 gloo workers (no Ray): train, checkpoint, crash, resume, gather + merge.

The merged model of a ZeRO-3 run must embed (and, for the re-ranker, score) like the ZeRO-0 run
on the same seed and data. Tolerance: EMB_TOL on L2-normalised fp32 embeddings. ZeRO-0
all-reduces whole gradients while ZeRO-3 reduce-scatters partitions (and, with GradCache, adds
them per micro-step), so the same sums are rounded in another order (~1e-7 relative); Adam's
per-element normalisation can stretch that on elements with near-zero gradients. Measured over
4 steps (with a crash and resume on the ZeRO-3 side): max |difference| 7.5e-8 with and without
the cache (re-ranker P(Yes): 6e-8), while training moves the embeddings by 4.6e-2 (re-ranker
scores by 8e-3). EMB_TOL sits two orders above that noise and three below what training moves;
the GradCache tau bug fixed alongside this test (tau's ZeRO-3 gradient adding onto the previous
step's) gave 5.9e-5 after 3 steps, which it catches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from gloo_workers import EMBEDDER_LOOP, RERANKER_LOOP, check, run_workers
from probes import embed, probe_items

from umarvel_ray.layout import STEPS_FILE
from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
from umarvel_ray.train.config import TrainConfig

pytestmark = pytest.mark.slow

EMB_TOL = 1e-5
MOVED = 1e-2


def _stage_cfg(run: Path, model: Path, data: Path, zero: int, micro: int, **kw) -> TrainConfig:
    base = dict(
        stage="stage3",
        run_dir=str(run),
        model=str(model),
        data_kind="mbeir",
        data_root=str(data),
        objective="infonce",
        lora_r=4,
        lora_alpha=8,
        lr=1e-3,
        per_device_batch=4,
        micro_batch=micro,
        max_examples=48,
        max_steps=4,
        save_every=2,
        log_every=1,
        zero_stage=zero,
        learn_tau=True,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig, entry: str = EMBEDDER_LOOP) -> None:
    check(run_workers(entry, dataclasses.asdict(cfg)))


def _assert_plain_hf_dir(model_dir: Path) -> None:
    """A merged, self-contained HF checkpoint: full weights, no adapter, loadable by transformers."""
    from safetensors import safe_open
    from transformers import AutoConfig

    assert (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").exists()
    (shard,) = model_dir.glob("*.safetensors")
    with safe_open(str(shard), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    assert AutoConfig.from_pretrained(model_dir).model_type == "qwen2_vl"


@pytest.mark.parametrize("micro", [0, 2], ids=["no_cache", "gradcache"])
def test_zero3_crash_resume_merge_equals_zero0(tmp_path, tiny_model_dir, toy_mbeir_dir, micro):
    ref = _stage_cfg(tmp_path / "z0", tiny_model_dir, toy_mbeir_dir, zero=0, micro=micro)
    _train(ref)
    z3 = _stage_cfg(
        tmp_path / "z3", tiny_model_dir, toy_mbeir_dir, zero=3, micro=micro, inject_failure_at_step=3
    )

    crashed = run_workers(EMBEDDER_LOOP, dataclasses.asdict(z3))
    assert crashed[0].returncode != 0 and "injected failure after step 3" in crashed[0].stderr
    ckpts = z3.stage_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step2"
    # each rank wrote its own ZeRO-3 partition
    shards = sorted(p.name for p in (ckpts / "global_step2").glob("zero_pp_rank_*_model_states.pt"))
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]
    _train(z3)  # resumes from global_step2 and replays step 3

    steps = [json.loads(x) for x in (z3.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 3, 4]
    assert steps[2]["indices"] == steps[3]["indices"]
    assert steps[3]["loss"] == pytest.approx(steps[2]["loss"], abs=1e-5)
    ref_steps = [json.loads(x) for x in (ref.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["loss"] for s in steps[3:]] == pytest.approx([s["loss"] for s in ref_steps[2:]], abs=1e-5)
    assert [s["grad_norm"] for s in steps[3:]] == pytest.approx(
        [s["grad_norm"] for s in ref_steps[2:]], rel=1e-4
    )

    summary = json.loads((z3.stage_dir / SUMMARY_FILE).read_text())
    ref_summary = json.loads((ref.stage_dir / SUMMARY_FILE).read_text())
    assert summary["resumed_at"] == 2 and summary["tau"] != pytest.approx(0.05, abs=1e-6)  # tau learned
    assert summary["tau"] == pytest.approx(ref_summary["tau"], rel=1e-6)
    assert summary["last"]["tau"] == pytest.approx(summary["tau"], rel=1e-6)  # gathered for the log

    _assert_plain_hf_dir(z3.model_dir)
    items = probe_items(toy_mbeir_dir)
    e0, e3, base = embed(ref.model_dir, items), embed(z3.model_dir, items), embed(tiny_model_dir, items)
    assert float(np.abs(e3 - e0).max()) < EMB_TOL
    assert float(np.abs(e0 - base).max()) > MOVED  # the comparison can tell trained from untrained


def test_zero3_reranker_merge_equals_zero0(tmp_path, tiny_model_dir, toy_mbeir_dir):
    from test_reranker_train import _cfg, _write_negatives

    from umarvel_ray.model.reranker import Reranker
    from umarvel_ray.train.reranker import RerankPairs

    def cfg(zero: int):
        return _cfg(
            tmp_path / f"z{zero}",
            toy_mbeir_dir,
            model=str(tiny_model_dir),
            lora_r=4,
            lora_alpha=8,
            lr=2e-3,
            per_device_batch=4,
            max_examples=8,
            max_steps=3,
            save_every=2,
            log_every=1,
            zero_stage=zero,
        )

    runs = {z: cfg(z) for z in (0, 3)}
    for c in runs.values():
        _write_negatives(toy_mbeir_dir, c.negatives_path())
        _train(c, RERANKER_LOOP)
    assert (runs[3].stage_dir / "checkpoints" / "latest").read_text().strip() == "global_step3"
    _assert_plain_hf_dir(runs[3].model_dir)

    pairs = RerankPairs(runs[0])
    from umarvel_ray.data.images import load_image

    def dec(item: dict) -> dict:
        return {**item, "image": load_image(toy_mbeir_dir, item["image"]) if item["image"] else None}

    items = [(dec(q), dec(c)) for q, c, _ in (pairs.pair(i, 0) for i in range(8))]
    s0, s3 = (Reranker.load(runs[z].model_dir).score(items) for z in (0, 3))
    base = Reranker.load(tiny_model_dir).score(items)
    assert float(np.abs(s3 - s0).max()) < EMB_TOL
    assert float(np.abs(s0 - base).max()) > 1e-3
