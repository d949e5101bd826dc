"""Ray Train + DeepSpeed on 2 CPU workers: ZeRO 0/1/2 train, restart after a crash, resubmit resumes.

Kept to few short TorchTrainer runs (tiny model, a few steps): every run starts two worker
processes on the shared 2-core machine. The ZeRO-0 run is the quick check; the failure/resume
runs (two worker-group starts each) are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from umarvel_ray.layout import STEPS_FILE
from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
from umarvel_ray.train.batches import ShardPlan
from umarvel_ray.train.config import TrainConfig
from umarvel_ray.train.data import build_source
from umarvel_ray.train.launch import run_stage, stage_done

pytestmark = pytest.mark.ray


def _cfg(tmp_path: Path, model: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        stage="stage3",
        run_dir=str(tmp_path / "run"),
        model=str(model),
        data_kind="mbeir",
        data_root=str(data),
        objective="infonce",
        lora_r=4,
        lora_alpha=8,
        lr=1e-3,
        per_device_batch=4,
        max_examples=64,
        max_steps=3,
        save_every=2,
        log_every=1,
        workers=2,
        cpus_per_worker=0.5,
        max_failures=0,
        learn_tau=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def _steps(cfg: TrainConfig) -> list[dict]:
    return [json.loads(line) for line in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]


def _expected_indices(cfg: TrainConfig, step: int) -> list[int]:
    """Rank 0's example indices for 1-based global step `step` according to the data plan."""
    plan = ShardPlan(len(build_source(cfg)), cfg.workers, 0, cfg.per_device_batch, cfg.seed)
    return plan.indices(*plan.position(step - 1)).tolist()


def _lm_weight(model_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    (name,) = [k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight") and "visual" not in k]
    return tensors[name]


def test_zero0_two_workers_train_and_merge(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_mbeir_dir, zero_stage=0)
    out = run_stage(cfg)
    assert out == cfg.model_dir and stage_done(cfg)
    steps = _steps(cfg)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["indices"] == _expected_indices(cfg, s["step"]) for s in steps)
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    assert summary["total_steps"] == 3 and summary["resumed_at"] == 0
    # LoRA was trained and merged: the merged weights moved away from the base model.
    assert not torch.equal(_lm_weight(out), _lm_weight(tiny_model_dir))
    # Ray persisted merged per-rank checkpoints (steps 2 and 3) with our state file.
    ckpts = sorted((Path(cfg.run_dir) / "ray" / cfg.stage).glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000003"]
    state = json.loads((ckpts[-1] / "global_step3" / "train_state.json").read_text())
    assert state["global_step"] == 3 and state["world_size"] == 2
    from umarvel_ray.model.embedder import Embedder

    emb = Embedder.load(out)
    assert emb.tau.dim() == 0 and abs(float(emb.tau) - summary["tau"]) < 1e-6
    # A finished stage is skipped on resubmission (restartable chain).
    assert run_stage(cfg) == out
    assert len(_steps(cfg)) == 3


@pytest.mark.slow
def test_zero1_restarts_from_checkpoint_after_worker_failure(
    ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir
):
    # Checkpoint after step 2, crash after step 3: Ray restarts the group (max_failures=1), the loop
    # resumes at step 3 from the checkpoint, so step 3 is trained twice on the same batch.
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        toy_mbeir_dir,
        zero_stage=1,
        max_steps=4,
        max_failures=1,
        inject_failure_at_step=3,
    )
    run_stage(cfg)
    steps = _steps(cfg)
    assert [s["step"] for s in steps] == [1, 2, 3, 3, 4]
    assert steps[2]["indices"] == steps[3]["indices"] == _expected_indices(cfg, 3)
    assert steps[4]["indices"] == _expected_indices(cfg, 4)
    assert json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())["resumed_at"] == 2


@pytest.mark.slow
def test_zero2_resubmit_same_name_resumes(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        toy_mbeir_dir,
        zero_stage=2,
        max_steps=4,
        micro_batch=2,
        inject_failure_at_step=3,
    )
    with pytest.raises(Exception, match="injected failure"):
        run_stage(cfg)
    assert not stage_done(cfg)
    assert [s["step"] for s in _steps(cfg)] == [1, 2, 3]
    run_stage(cfg)  # same run_dir + stage name: Ray hands the step-2 checkpoint back
    steps = _steps(cfg)
    assert [s["step"] for s in steps] == [1, 2, 3, 3, 4]
    assert steps[2]["indices"] == steps[3]["indices"]
    assert json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())["resumed_at"] == 2
