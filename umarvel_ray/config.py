"""Dataclass configs loaded from YAML with `a.b=value` CLI overrides.

Every job describes its settings as a (possibly nested) dataclass whose fields carry help text in
`field(metadata={"help": ...})`. A job loads a YAML preset, applies CLI overrides, and writes the
resolved config next to its outputs so a run can always be reproduced from its artefacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


def option(default: Any, help: str) -> Any:
    """A dataclass field with help text (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass it is loaded into."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert YAML/CLI values into the declared field type (nested dataclasses included)."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed for type {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return (
                tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from exc
    if tp is str:
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a mapping, rejecting unknown keys so typos never pass silently."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A YAML-safe mapping of a config (Paths become strings)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested mapping; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Defaults of `cls`, then the YAML file (if any), then the overrides, validated.

    `section` picks one top-level key of the YAML when it is there, so one recipe file
    (`jobs/configs/toy.yaml`) configures `jobs/pipeline.py` and every single-step job alike.
    """
    data = to_dict(cls())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        if section is not None and isinstance(loaded.get(section), dict):
            loaded = _section(cls, loaded, section)
        deep_update(data, loaded, str(path))
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def _section(cls: type, loaded: dict[str, Any], section: str) -> dict[str, Any]:
    """One section of a recipe file, inheriting the file's shared top-level scalars it also has
    (`run_dir`, `data_root`, ...) unless the section sets them itself."""
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {k: v for k, v in loaded.items() if k in names and not isinstance(v, dict)}
    return {**shared, **loaded[section]}


def deep_update(base: dict[str, Any], new: dict[str, Any], where: str = "") -> None:
    """Merge `new` into `base` in place, recursing into mappings present on both sides."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v, f"{where}:{k}")
        else:
            base[k] = v


def save_config(cfg: Any, out_dir: str | Path, name: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config next to a job's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def help_lines(cls: type, prefix: str = "") -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(_field_types(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            lines += help_lines(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else "(factory)"
            lines.append(f"  {prefix}{f.name} = {default!r}  {f.metadata.get('help', '')}")
    return lines


def parse_job_args(
    cls: type[T],
    argv: list[str] | None = None,
    description: str = "",
    default_config: str | None = None,
    section: str | None = None,
) -> T:
    """Standard job CLI: `--config FILE` then `key=value` overrides; `--help` lists every key."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key=value):\n" + "\n".join(help_lines(cls)),
    )
    parser.add_argument("--config", default=default_config, help="YAML preset to load first")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides, section=section)
