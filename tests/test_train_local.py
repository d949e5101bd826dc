"""The training loop without Ray: a plain process (world size 1), local checkpoints, crash + resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umarvel_ray.layout import STEPS_FILE
from umarvel_ray.layout import TRAIN_SUMMARY_FILE as SUMMARY_FILE
from umarvel_ray.train.config import TrainConfig

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from umarvel_ray.train.embedder import run_local
from umarvel_ray.train.config import TrainConfig
run_local(TrainConfig(**json.loads(sys.argv[1])))
"""


def _run(cfg: TrainConfig) -> subprocess.CompletedProcess:
    import dataclasses

    return subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(dataclasses.asdict(cfg))],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_single_process_gradcache_stage_crash_and_resume(tmp_path, tiny_model_dir, toy_mbeir_dir):
    cfg = TrainConfig(
        stage="stage2",
        run_dir=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        data_kind="caption",
        data_root=str(toy_mbeir_dir),
        train_file="pretrain/caption_pairs.jsonl",
        objective="symmetric",
        num_negatives=0,
        lora_r=4,
        lora_alpha=8,
        lr=1e-3,
        per_device_batch=6,
        micro_batch=4,
        max_examples=60,
        max_steps=4,
        save_every=2,
        log_every=1,
        zero_stage=1,
        learn_tau=False,
        inject_failure_at_step=3,
    )
    first = _run(cfg)
    assert first.returncode != 0 and "injected failure after step 3" in first.stderr
    ckpts = cfg.stage_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step2"
    second = _run(cfg)
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [json.loads(x) for x in (cfg.stage_dir / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 3, 4]
    assert steps[2]["indices"] == steps[3]["indices"] and steps[2]["loss"] == pytest.approx(
        steps[3]["loss"], abs=1e-5
    )
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    assert summary["resumed_at"] == 2 and summary["tau"] == pytest.approx(0.05, abs=1e-6)  # tau frozen
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step2", "global_step4"]
    assert (cfg.model_dir / "umarvel_embedder.json").is_file() and (
        Path(cfg.stage_dir) / "config.yaml"
    ).is_file()


@pytest.mark.gpu
def test_single_gpu_bf16_gradient_checkpointing(tmp_path, tiny_model_dir, toy_mbeir_dir):
    pytest.importorskip("deepspeed", reason="run_local trains through DeepSpeed (jobs/gpu_check.sh's machine has none)")
    cfg = TrainConfig(
        stage="stage3",
        run_dir=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        data_kind="mbeir",
        data_root=str(toy_mbeir_dir),
        lora_r=4,
        lora_alpha=8,
        per_device_batch=8,
        max_examples=64,
        max_steps=3,
        save_every=2,
        log_every=1,
        zero_stage=1,
        use_gpu=True,
        gradient_checkpointing=True,
    )
    done = _run(cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((cfg.stage_dir / SUMMARY_FILE).read_text())
    assert summary["config"]["use_gpu"] and summary["total_steps"] == 3
    from safetensors import safe_open

    (shard,) = sorted(cfg.model_dir.glob("*.safetensors"))[:1]
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # bf16 weights on GPU
