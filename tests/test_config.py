from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from umarvel_ray.config import ConfigError, load_config, parse_job_args, save_config


@dataclass
class Inner:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    targets: list[str] = field(default_factory=lambda: ["q_proj"])


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    use_gpu: bool = False
    out: Path | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"steps": 20, "inner": {"lr": 2e-4}}))
    cfg = load_config(Outer, cfg_file, ["inner.lr=3e-4", "use_gpu=true", "out=/tmp/x", "inner.targets=[a,b]"])
    assert cfg.steps == 20
    assert cfg.inner.lr == pytest.approx(3e-4)
    assert cfg.use_gpu is True
    assert cfg.out == Path("/tmp/x")
    assert cfg.inner.targets == ["a", "b"]
    assert cfg.name == "run"


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match=r"inner: unknown key\(s\) \['lrr'\]"):
        load_config(Outer, None, ["inner.lrr=1"])


def test_bad_type_names_the_key():
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(Outer, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="use_gpu: expected a boolean"):
        load_config(Outer, None, ["use_gpu=maybe"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["steps=7", "inner.lr=0.5"])
    path = save_config(cfg, tmp_path / "out")
    assert path.name == "config.yaml"
    assert load_config(Outer, path) == cfg


def test_parse_job_args_cli():
    cfg = parse_job_args(Outer, ["steps=3", "name=abc"])
    assert (cfg.steps, cfg.name) == (3, "abc")


def test_section_inherits_shared_top_level_keys(tmp_path):
    cfg_file = tmp_path / "recipe.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "shared", "steps": 5, "train": {"steps": 9}, "other": {"x": 1}}))
    cfg = load_config(Outer, cfg_file, ["inner.lr=1"], section="train")
    assert (cfg.name, cfg.steps, cfg.inner.lr) == ("shared", 9, 1.0)


def test_yaml_boolean_into_a_string_field_keeps_the_word():
    """`use_gpu=true` on a str field (auto|true|false) is YAML's boolean: it must arrive as 'true',
    not Python's 'True', which the jobs' own value checks refuse."""
    from umarvel_ray.embed.config import EmbedConfig

    assert load_config(Outer, None, ["name=true"]).name == "true"
    assert load_config(EmbedConfig, None, ["use_gpu=false"]).use_gpu == "false"
    assert load_config(EmbedConfig, None, ["use_gpu=true"]).use_gpu == "true"
