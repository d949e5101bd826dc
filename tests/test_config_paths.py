"""Every path in every job's config is absolute after loading, whatever the working directory.

The walk finds the config dataclasses itself (every dataclass with help texts in `umarvel_ray/`
and `jobs/`), so a new config or a new path field is covered without editing this file: a field
whose name says it holds a path must carry a path kind, and every path field must come out
absolute, relative to the directory the job started in (or to data_root, for M-BEIR file names).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import yaml

import umarvel_ray
from umarvel_ray.config import (
    PATH_DATA,
    PATH_MODEL,
    ConfigError,
    load_config,
    require_absolute,
    resolve_paths,
)
from umarvel_ray.recipe import Recipe, RecipeConfig
from umarvel_ray.train.config import STAGE_ORDER, TrainConfig, TrainJobConfig, resolve_stages, stage_config

REPO = Path(__file__).resolve().parents[1]
# Names that hold a path (or a model that may be a local directory) in this project's configs.
PATHLIKE = re.compile(
    r"(^|_)(dir|root|file|path|model|adapter|input|output|embeddings|instructions|config|pool|from)$|^reranker$"
)
NOT_PATHS = {("EvalConfig", "local_source"), ("MineConfig", "pool")}  # pool = union|local, a choice


def _config_classes() -> list[type]:
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(umarvel_ray.__path__, "umarvel_ray.")]
    for job in sorted((REPO / "jobs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_jobs_{job.stem}", job)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    found = {}
    for module in modules:
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__name__.endswith("Config")
                and any("help" in f.metadata for f in dataclasses.fields(obj))
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(found.values(), key=lambda c: c.__name__)


CONFIGS = _config_classes()
WITH_PATHS = [c for c in CONFIGS if any(f.metadata.get("path") for f in dataclasses.fields(c))]


def test_the_walk_finds_every_job_config():
    names = {c.__name__ for c in CONFIGS}
    assert {
        "RecipeConfig",
        "TrainJobConfig",
        "TrainConfig",
        "RerankerTrainConfig",
        "MineConfig",
        "TeacherConfig",
        "EmbedConfig",
        "EvalConfig",
        "BuildIndexConfig",
    } <= names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_named_like_a_path_has_a_path_kind(cls):
    untagged = [
        f.name
        for f in dataclasses.fields(cls)
        if PATHLIKE.search(f.name)
        and "path" not in f.metadata
        and (cls.__name__, f.name) not in NOT_PATHS
        and f.type in ("str", "str | None")
    ]
    assert untagged == [], f"{cls.__name__}: mark these with a path kind (config.PATH_KINDS): {untagged}"


def _relative_values(cls: type) -> dict:
    """Every path field of `cls` (and of its nested sections) set to a relative value."""
    out: dict = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("path")
        if kind == PATH_MODEL:
            out[f.name] = "models/some/merged"  # two slashes: a local directory, not a hub id
        elif kind is not None:
            out[f.name] = f"rel/{f.name}"
        elif f.metadata.get("keys_of") is not None:
            out[f.name] = _relative_values(f.metadata["keys_of"])
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = _relative_values(f.default_factory)
    return out


def _assert_absolute(cfg, data_root: Path | None, where: str, under_root: bool = True) -> int:
    checked = 0
    root = Path(cfg.data_root) if getattr(cfg, "data_root", "") else data_root
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            checked += _assert_absolute(value, root, f"{where}.{f.name}", under_root)
        elif f.metadata.get("keys_of") is not None:
            kinds = {g.name: g.metadata.get("path") for g in dataclasses.fields(f.metadata["keys_of"])}
            for key, item in value.items():
                if kinds.get(key):
                    assert Path(item).is_absolute(), f"{where}.{f.name}.{key} = {item!r}"
                    checked += 1
        elif f.metadata.get("path") and value:
            assert Path(value).is_absolute(), f"{where}.{f.name} = {value!r}"
            assert "{run_dir}" not in value, f"{where}.{f.name} = {value!r}"
            if under_root and f.metadata["path"] == PATH_DATA and root is not None:
                assert Path(value).is_relative_to(root), f"{where}.{f.name} = {value!r} not under {root}"
            checked += 1
    return checked


@pytest.mark.parametrize("cls", WITH_PATHS, ids=lambda c: c.__name__)
def test_no_path_field_survives_loading_relative(cls, tmp_path, monkeypatch):
    """Relative values from a YAML file in another directory resolve against the working directory."""
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    preset = elsewhere / "preset.yaml"
    preset.write_text(yaml.safe_dump(_relative_values(cls)))
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    cfg = load_config(cls, preset)
    assert _assert_absolute(cfg, None, cls.__name__) > 0
    require_absolute(cfg)
    for f in dataclasses.fields(cls):
        if f.metadata.get("path") and f.name in ("run_dir", "data_root", "output_dir", "out_dir", "output"):
            assert getattr(cfg, f.name) == str(start / "rel" / f.name)
    assert resolve_paths(cfg) == cfg  # idempotent


def test_recipe_paths_resolve_against_the_start_directory_in_every_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RecipeConfig, REPO / "jobs/configs/toy.yaml")
    assert cfg.run_dir == str(tmp_path / "runs/toy") and cfg.data_root == str(tmp_path / "data/toy_mbeir")
    for section in ("mine", "teacher", "eval", "reranker", "train"):
        assert getattr(cfg, section).data_root == cfg.data_root, section
    assert cfg.mine.query_file == str(tmp_path / "data/toy_mbeir/query/train/mbeir_union_up_train.jsonl")
    assert cfg.reranker.negatives_file == str(tmp_path / "runs/toy/negatives/negatives.jsonl")
    job = Recipe(cfg).train_job()
    for stage in STAGE_ORDER:
        stage_cfg = stage_config(job, stage)
        assert _assert_absolute(stage_cfg, None, stage, under_root=False) >= 5
        require_absolute(stage_cfg)
    assert stage_config(job, "stage3").model == str(tmp_path / "runs/toy/stage2/model")


def test_stage_sections_resolve_their_path_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_config(
        TrainJobConfig,
        None,
        [
            "run_dir=runs/r",
            "data_root=data",
            "stage4.negatives_file={run_dir}/negatives/n.jsonl",
            "stage3.train_file=query/train/mine.jsonl",
            "common.deepspeed_config=ds/zero.json",
            "stage1.model=models/my/base",
        ],
    )
    assert job.stage4["negatives_file"] == str(tmp_path / "runs/r/negatives/n.jsonl")
    assert job.stage3["train_file"] == str(tmp_path / "data/query/train/mine.jsonl")
    assert job.common["deepspeed_config"] == str(tmp_path / "ds/zero.json")
    stages = {c.stage: c for c in resolve_stages(job)}
    assert stages["stage1"].model == str(tmp_path / "models/my/base")
    assert stages["stage2"].model == str(tmp_path / "runs/r/stage1/model")
    assert stages["stage5"].teacher_file == str(tmp_path / "runs/r/teacher/teacher.jsonl")  # preset


@pytest.mark.parametrize(
    ("model", "kept"),
    [("Qwen/Qwen2-VL-7B-Instruct", True), ("tiny", True), ("runs/toy/base_model", False), ("./m", False)],
)
def test_hub_ids_stay_hub_ids_and_local_models_become_absolute(model, kept, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TrainJobConfig, None, [f"model={model}"])
    assert cfg.model == (model if kept else str((tmp_path / model).resolve()))


def test_library_entry_points_refuse_relative_paths():
    with pytest.raises(ConfigError, match=r"TrainConfig.run_dir='runs/x' is relative"):
        require_absolute(TrainConfig(run_dir="runs/x", data_root="/data"))
    require_absolute(TrainConfig(run_dir="/r", data_root="/data"))  # M-BEIR names stay under data_root


def test_run_dir_template_without_a_run_dir_is_an_error(tmp_path, monkeypatch):
    from umarvel_ray.mine.config import MineConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"query_file: .* uses \{run_dir\} but this config has no run_dir"):
        load_config(MineConfig, None, ["query_file={run_dir}/q.jsonl"])


def test_a_nested_section_takes_its_parents_data_root():
    from umarvel_ray.mine.config import MineConfig

    require_absolute(MineConfig(data_root="/data", output_dir="/out"))  # embed.instructions under /data
    with pytest.raises(ConfigError, match=r"MineConfig.embed.instructions='instructions/"):
        require_absolute(MineConfig(output_dir="/out", query_file="/q.jsonl", pool_file="/p.jsonl"))
