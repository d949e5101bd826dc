"""The recipe presets load into every job's config, and the chain wires outputs to inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from umarvel_ray.config import ConfigError, load_config
from umarvel_ray.eval.plan import EvalConfig
from umarvel_ray.mine.config import MineConfig
from umarvel_ray.recipe import STEPS, MissingStageOutput, Recipe, RecipeConfig
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.train.config import TrainJobConfig
from umarvel_ray.train.reranker import RerankerTrainConfig

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["jobs/configs/toy.yaml", "jobs/configs/paper_qwen2vl7b.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_for_the_pipeline_and_every_single_job(preset):
    path = REPO / preset
    recipe = load_config(RecipeConfig, path)
    assert recipe.steps == list(STEPS)
    for cls, section in [
        (TrainJobConfig, "train"),
        (MineConfig, "mine"),
        (RerankerTrainConfig, "reranker"),
        (TeacherConfig, "teacher"),
        (EvalConfig, "eval"),
    ]:
        cfg = load_config(cls, path, section=section)
        if hasattr(cfg, "data_root"):
            assert cfg.data_root == recipe.data_root, (cls, section)
        if hasattr(cfg, "run_dir"):
            assert cfg.run_dir == recipe.run_dir, (cls, section)
        nested = getattr(recipe, section)  # the same section inside the pipeline's config
        for key in ("data_root", "run_dir"):
            if hasattr(nested, key):
                assert getattr(nested, key) == getattr(recipe, key), (section, key)


def test_chain_wires_each_step_to_the_previous_outputs(tmp_path):
    cfg = load_config(
        RecipeConfig, REPO / "jobs/configs/toy.yaml", [f"run_dir={tmp_path}", "data_root=/data"]
    )
    recipe = Recipe(cfg)
    assert recipe.base_model_dir == str(tmp_path / "base_model")
    job = recipe.train_job()
    assert (job.run_dir, job.data_root, job.model) == (str(tmp_path), "/data", str(tmp_path / "base_model"))
    assert job.stage4["negatives_file"] == str(tmp_path / "negatives" / "negatives.jsonl")
    assert job.stage5["teacher_file"] == str(tmp_path / "teacher" / "teacher.jsonl")
    # nothing trained yet: a consumer of stage 3's model is told which stage and path are missing
    with pytest.raises(MissingStageOutput, match=rf"stage3's merged model {tmp_path}/stage3/model does not exist"):
        recipe.latest_model(before="stage4")
    for stage in ("stage1", "stage2", "stage3"):
        (tmp_path / stage / "model").mkdir(parents=True)
        (tmp_path / stage / "model" / "config.json").write_text("{}")
    assert recipe.latest_model(before="stage4") == str(tmp_path / "stage3" / "model")
    assert recipe.latest_model(before="stage3") == str(tmp_path / "stage2" / "model")
    assert recipe.latest_model(before="stage1") == str(tmp_path / "base_model")  # the chain starts here
    with pytest.raises(MissingStageOutput, match="stage5's merged model"):
        recipe.latest_model()


def test_a_chain_that_starts_later_uses_the_base_model(tmp_path):
    cfg = load_config(
        RecipeConfig, REPO / "jobs/configs/toy.yaml", [f"run_dir={tmp_path}", "train.stages=[stage4]"]
    )
    recipe = Recipe(cfg)
    assert recipe.latest_model(before="stage4") == str(tmp_path / "base_model")
    with pytest.raises(MissingStageOutput, match="stage4's merged model"):
        recipe.latest_model()


def test_unknown_step_is_rejected():
    with pytest.raises(ConfigError, match=r"steps: unknown \['stage9'\]"):
        load_config(RecipeConfig, None, ["steps=[data,stage9]"])


def test_teacher_uses_the_trained_reranker_and_refuses_a_missing_one(tmp_path):
    cfg = load_config(
        RecipeConfig, REPO / "jobs/configs/toy.yaml", [f"run_dir={tmp_path}", "train.stages=[]"]
    )
    recipe = Recipe(cfg)
    with pytest.raises(MissingStageOutput, match=rf"reranker's merged model {tmp_path}/reranker/model"):
        recipe.teacher_config()
    no_reranker = Recipe(dataclasses.replace(cfg, steps=[s for s in STEPS if s != "reranker"]))
    assert no_reranker.teacher_config().reranker is None  # cos-only teacher, as configured
    (tmp_path / "reranker" / "model").mkdir(parents=True)
    (tmp_path / "reranker" / "model" / "config.json").write_text("{}")
    teacher = recipe.teacher_config()
    assert teacher.reranker == str(tmp_path / "reranker" / "model")
    assert teacher.output_dir == str(tmp_path / "teacher")


def test_the_final_line_names_the_serve_command_for_the_trained_model(tmp_path):
    cfg = load_config(RecipeConfig, REPO / "jobs/configs/toy.yaml", [f"run_dir={tmp_path}"])
    recipe = Recipe(cfg)
    assert recipe.serve_command() is None  # nothing evaluated yet
    for d in ("stage1", "stage2", "stage3", "stage4", "stage5", "reranker"):
        (tmp_path / d / "model").mkdir(parents=True)
        (tmp_path / d / "model" / "config.json").write_text("{}")
    (tmp_path / "eval/stage5/index").mkdir(parents=True)
    (tmp_path / "eval/stage5/index/global.meta.json").write_text("{}")
    (tmp_path / "eval/stage5/embeddings/pool-global").mkdir(parents=True)
    (tmp_path / "eval/stage5/embeddings/pool-global/manifest.json").write_text("{}")
    assert recipe.serve_command() == (
        f"serve run umarvel_ray.serve.app:build_app model_dir={tmp_path}/stage5/model "
        f"index_dir={tmp_path}/eval/stage5/index/global "
        f"embeddings_dir={tmp_path}/eval/stage5/embeddings/pool-global reranker_dir={tmp_path}/reranker/model"
    )


def test_a_chain_without_pretraining_pairs_stops_before_any_work(tmp_path):
    data = tmp_path / "data"
    (data / "query").mkdir(parents=True)  # a user's directory: no pretrain/ folder
    cfg = load_config(
        RecipeConfig, REPO / "jobs/configs/toy.yaml", [f"run_dir={tmp_path}/run", f"data_root={data}"]
    )
    with pytest.raises(ConfigError, match=r"stage1 \(nli pairs\) needs .*pretrain/nli_pairs.jsonl"):
        Recipe(cfg).run()
    assert not (tmp_path / "run").exists()


def test_reranker_and_teacher_get_their_inputs_and_the_holdout(tmp_path):
    cfg = load_config(
        RecipeConfig,
        REPO / "jobs/configs/toy.yaml",
        [f"run_dir={tmp_path}", "reranker_init=stage3", "holdout_fraction=0.1"],
    )
    recipe = Recipe(cfg)
    for d in ("stage3", "stage4", "reranker"):
        (tmp_path / d / "model").mkdir(parents=True)
        (tmp_path / d / "model" / "config.json").write_text("{}")
    assert recipe.reranker_negatives() == tmp_path / "negatives_reranker" / "negatives.jsonl"
    without = Recipe(dataclasses.replace(cfg, steps=[s for s in STEPS if s != "mine_reranker"]))
    assert without.reranker_negatives() == tmp_path / "negatives" / "negatives.jsonl"
    teacher = recipe.teacher_config()
    assert (teacher.holdout_fraction, teacher.model) == (0.1, str(tmp_path / "stage4" / "model"))
    from umarvel_ray.train.config import stage_config

    job = recipe.train_job()
    assert {stage_config(job, s).holdout_fraction for s in ("stage3", "stage4", "stage5")} == {0.1}
    with pytest.raises(ConfigError, match="reranker_init must be one of"):
        load_config(RecipeConfig, None, ["reranker_init=stage9"])
