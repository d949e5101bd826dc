"""Stage configs: recipe presets, layering, chaining, YAML presets, DeepSpeed JSON, LR schedule."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from umarvel_ray.config import ConfigError, load_config
from umarvel_ray.train.config import (
    STAGE_PRESETS,
    LoraRunConfig,
    TrainConfig,
    TrainJobConfig,
    resolve_stages,
    stage_config,
)
from umarvel_ray.train.engine import deepspeed_config, lr_lambda, zero_template

REPO = Path(__file__).resolve().parents[1]

# docs/RECIPE.md section 3 table: (LoRA r, alpha, LR, per-device batch, epochs, objective, tau learned)
RECIPE = {
    "stage1": (64, 128, 2e-4, 72, 2, "infonce", False),
    "stage2": (128, 256, 1e-4, 60, 1, "symmetric", False),
    "stage3": (128, 256, 4e-4, 60, 1, "infonce", True),
    "stage4": (128, 256, 1.5e-5, 17, 1, "infonce", True),
    "stage5": (128, 256, 1e-5, 2, 1, "distill", True),
}


def _table(cfg: TrainConfig) -> tuple:
    return (
        cfg.lora_r,
        cfg.lora_alpha,
        cfg.lr,
        cfg.per_device_batch,
        cfg.epochs,
        cfg.objective,
        cfg.learn_tau,
    )


@pytest.mark.parametrize("stage", sorted(RECIPE))
def test_presets_and_paper_yaml_follow_the_recipe(stage):
    job = TrainJobConfig(run_dir="/r", model="base")
    assert _table(stage_config(job, stage)) == RECIPE[stage]
    paper = load_config(TrainJobConfig, REPO / "jobs/configs/paper_qwen2vl7b.yaml", section="train")
    cfg = stage_config(paper, stage)
    assert _table(cfg) == RECIPE[stage]
    assert (cfg.workers, cfg.zero_stage, cfg.use_gpu, cfg.gradient_checkpointing, cfg.lora_dropout) == (
        64,
        1,
        True,
        True,
        0.05,
    )
    assert cfg.warmup_ratio == 0.03 and cfg.tau_init == 0.05 and cfg.dtype == "bfloat16"
    assert paper.model == "Qwen/Qwen2-VL-7B-Instruct"
    assert STAGE_PRESETS["stage4"]["num_negatives"] == 5 and STAGE_PRESETS["stage5"]["num_candidates"] == 50


def test_layering_and_chaining():
    job = TrainJobConfig(
        run_dir="/runs/x",
        model="base-model",
        stages=["stage2", "stage3", "stage4"],
        common={"workers": 4, "lr": 1.0},
        stage3={"lr": 2.0},
    )
    s2, s3, s4 = resolve_stages(job)
    assert (s2.workers, s2.lr, s3.lr) == (4, 1.0, 2.0)  # preset < common < stage section
    assert s2.model == "base-model"  # first stage of this chain starts from the base
    assert s3.model == "/runs/x/stage2/model" and s4.model == "/runs/x/stage3/model"
    assert s4.negatives_file == "/runs/x/negatives/negatives.jsonl"  # {run_dir} expanded at resolution
    assert str(s4.data_path(s4.negatives_file)) == "/runs/x/negatives/negatives.jsonl"
    assert [c.stage for c in resolve_stages(job, "stage4")] == ["stage4"]
    assert s3.model_dir == Path("/runs/x/stage3/model")
    with pytest.raises(ConfigError, match="unknown stage"):
        resolve_stages(job, "stage9")
    with pytest.raises(ConfigError, match="unknown key"):
        stage_config(TrainJobConfig(stage3={"learning_rate": 1}), "stage3")
    with pytest.raises(ConfigError, match="distill"):
        TrainConfig(objective="distill", data_kind="mbeir")


def test_toy_yaml_resolves_every_stage():
    toy = load_config(TrainJobConfig, REPO / "jobs/configs/toy.yaml", section="train")
    cfgs = resolve_stages(toy)
    assert [c.stage for c in cfgs] == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    assert all(not c.use_gpu and c.workers == 2 and c.max_steps > 0 for c in cfgs)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cluster_deepspeed_json_equals_builtin_and_fills(stage):
    on_disk = json.loads((REPO / f"cluster/deepspeed/zero{stage}.json").read_text())
    assert on_disk == zero_template(stage)
    cfg = TrainConfig(
        zero_stage=stage,
        deepspeed_config=str(REPO / f"cluster/deepspeed/zero{stage}.json"),
        lr=3e-4,
        per_device_batch=7,
        grad_clip=0.5,
    )
    ds = deepspeed_config(cfg, bf16=True)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["torch_adam"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"], ds["bf16"]["enabled"]) == (
        7,
        0.5,
        True,
    )
    assert "auto" not in json.dumps(ds)


def test_embedder_and_reranker_share_the_lora_run_fields_with_their_own_defaults():
    from umarvel_ray.train.reranker import RerankerTrainConfig

    shared = {f.name for f in dataclasses.fields(LoraRunConfig)}
    assert {"lora_r", "lr", "zero_stage", "workers", "save_every", "resume_from"} <= shared
    for cls in (TrainConfig, RerankerTrainConfig):
        assert shared <= {f.name for f in dataclasses.fields(cls)}, cls
    stage, judge = TrainConfig(), RerankerTrainConfig()
    assert (stage.model, stage.lr, stage.per_device_batch) == ("", 4e-4, 60)
    assert (judge.model, judge.lr, judge.per_device_batch) == ("Qwen/Qwen2-VL-7B-Instruct", 1e-4, 8)
    assert (stage.failure_step, TrainConfig(inject_failure_at_step=3).failure_step, judge.failure_step) == (0, 3, 0)
    assert str(judge.model_dir) == "runs/default/reranker/model" and str(stage.model_dir) == "runs/default/stage3/model"
    with pytest.raises(ConfigError, match="zero_stage"):
        RerankerTrainConfig(zero_stage=4)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(total_steps=100, warmup_ratio=0.03, min_ratio=0.0)
    assert [f(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)
    mid = 3 + (100 - 3) / 2
    assert f(int(mid)) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 3) / 97)))
    assert f(99) < 0.01 and f(100) == pytest.approx(0.0)
    g = lr_lambda(10, 0.0, 0.1)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1)


def _train_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs/train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_job_cli_exit_codes(capsys):
    job = _train_job()
    assert job.main(["--help-stage"]) == 0
    assert "per_device_batch" in capsys.readouterr().out
    # --help is the job's own help (stages, common, stageN), not an abbreviation of --help-stage.
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "stages = " in out and "per-stage keys" not in out
    toy = str(REPO / "jobs/configs/toy.yaml")
    assert job.main(["--config", toy, "stage3.learning_rate=1"]) == 2  # unknown key: refused before Ray
    assert job.main(["--config", toy, "--stage", "stage7"]) == 2
