"""Dataclass configs loaded from YAML with `a.b=value` CLI overrides.

Every job describes its settings as a (possibly nested) dataclass whose fields carry help text in
`field(metadata={"help": ...})`. A job loads a YAML preset, applies CLI overrides, and writes the
resolved config next to its outputs so a run can always be reproduced from its artefacts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


# Path fields carry `metadata["path"]`, one of these kinds (see `resolve_paths`):
PATH_CWD = "cwd"  # relative to the directory the job was started from
PATH_DATA = "data"  # relative to the same config's data_root (M-BEIR layout names), else as PATH_CWD
PATH_MODEL = "model"  # a local directory (then as PATH_CWD) or a Hugging Face hub id, kept as given
PATH_KINDS = (PATH_CWD, PATH_DATA, PATH_MODEL)
# Sections of a recipe file take these from the top level unless they set them themselves.
SHARED_KEYS = ("run_dir", "data_root")
RUN_DIR_TEMPLATE = "{run_dir}"


def option(default: Any, help: str, path: str | None = None, keys_of: type | None = None) -> Any:
    """A dataclass field with help text (mutable defaults are copied per instance).

    `path` marks a path field of that kind (PATH_KINDS); `keys_of` marks a dict of overrides for
    that dataclass, whose path keys are resolved like the class's own fields.
    """
    metadata: dict[str, Any] = {"help": help}
    if path is not None:
        if path not in PATH_KINDS:
            raise ValueError(f"path kind must be one of {PATH_KINDS}, got {path!r}")
        metadata["path"] = path
    if keys_of is not None:
        metadata["keys_of"] = keys_of
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


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
    if tp is str:  # `use_gpu=true` is YAML's boolean: keep the word the user wrote, not Python's 'True'
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
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
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _parse_scalar(raw: str) -> Any:
    """A CLI value as YAML (numbers, lists, mappings), or the raw string when it is not valid YAML
    (`{run_dir}/x.jsonl` is a path, not a broken mapping)."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Defaults of `cls`, then the YAML file (if any), then the overrides, validated.

    `section` picks one top-level key of the YAML when it is there, so one recipe file
    (`jobs/configs/toy.yaml`) configures `jobs/recipe.py` and every single-step job alike.
    Sections of `cls` that are themselves config dataclasses take `run_dir` and `data_root` from
    the level above unless they set their own (SHARED_KEYS). Every path field is then made
    absolute once, here, relative to the current working directory (the job's start directory,
    or the job's working directory under `ray job submit --working-dir`): see `resolve_paths`.
    """
    data = to_dict(cls())
    explicit: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        if section is not None and isinstance(loaded.get(section), dict):
            loaded = _section(cls, loaded, section)
        deep_update(data, loaded, str(path))
        explicit = copy.deepcopy(loaded)
    apply_overrides(data, list(overrides or []))
    apply_overrides(explicit, list(overrides or []))
    _inherit_shared(cls, data, explicit)
    return resolve_paths(from_dict(cls, data))


def _inherit_shared(cls: type, data: dict[str, Any], explicit: dict[str, Any]) -> None:
    """Copy SHARED_KEYS from `data` into each nested config section that does not set them."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        sub_cls, _ = _unwrap_optional(hints[f.name])
        if not dataclasses.is_dataclass(sub_cls) or not isinstance(data.get(f.name), dict):
            continue
        sub_names = {g.name for g in dataclasses.fields(sub_cls)}
        given = explicit.get(f.name) if isinstance(explicit.get(f.name), dict) else {}
        for key in SHARED_KEYS:
            if key in data and key in sub_names and key not in given:
                data[f.name][key] = data[key]
        _inherit_shared(sub_cls, data[f.name], given)


def is_local_model(value: str, base: Path) -> bool:
    """Whether a model reference names a local directory rather than a Hugging Face hub id.

    Local: absolute, `~`, `./` or `../` paths, anything that exists under `base`, and anything with
    two or more slashes (a hub id is `name` or `namespace/name`, huggingface_hub's repo-id rule).
    Else a hub id (or the `tiny` keyword), kept as given, as `from_pretrained` would treat it.
    """
    if not value:
        return False
    p = Path(value).expanduser()
    return (
        p.is_absolute()
        or value.startswith(("./", "../", "~"))
        or value in (".", "..")
        or value.count("/") >= 2
        or (base / p).exists()
    )


def check_model_dir(value: str, field_name: str) -> None:
    """Refuse a model that names a local directory without a saved model in it (a hub id passes:
    `from_pretrained` resolves it). Raises ConfigError naming the field and the path."""
    if is_local_model(value, Path.cwd()) and not (Path(value).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"{field_name}: model directory {value} not found (no config.json there); give a merged "
            "model directory (a training stage's <run_dir>/<stage>/model) or a Hugging Face hub id"
        )


def resolve_paths(cfg: T, base: str | Path | None = None) -> T:
    """`cfg` with every path field absolute, nested sections and `keys_of` dicts included.

    Kinds (`metadata["path"]`): PATH_CWD fields resolve against `base` (default: the current
    working directory); PATH_DATA fields against the same config's (already absolute) `data_root`,
    or `base` when it has none; PATH_MODEL fields like PATH_CWD when `is_local_model`, else they
    stay hub ids. `{run_dir}` in any path field is replaced by the config's absolute `run_dir`.
    Empty values and None mean "unset" and stay so. Idempotent.

    Raises ConfigError for a `{run_dir}` template in a config that has no run_dir.
    """
    root = Path(os.path.abspath(base if base is not None else Path.cwd()))
    return _resolve_node(cfg, root)


def _resolve_node(cfg: T, base: Path) -> T:
    fields = dataclasses.fields(cfg)
    names = {f.name for f in fields}
    updates: dict[str, Any] = {}
    context: dict[str, str] = {}
    for key in SHARED_KEYS:  # run_dir, then data_root: everything else resolves against them
        value = getattr(cfg, key, None) if key in names else None
        if isinstance(value, str) and value:
            value = _resolve_value(value, PATH_CWD, base, context, key)
            updates[key] = context[key] = value
    for f in fields:
        value = getattr(cfg, f.name)
        kind = f.metadata.get("path")
        if f.name in updates:
            continue
        if kind is not None and isinstance(value, str):
            updates[f.name] = _resolve_value(value, kind, base, context, f.name)
        elif dataclasses.is_dataclass(value):
            updates[f.name] = _resolve_node(value, base)
        elif f.metadata.get("keys_of") is not None and isinstance(value, dict):
            updates[f.name] = _resolve_dict(value, f.metadata["keys_of"], base, context, f.name)
    return dataclasses.replace(cfg, **updates)


def _resolve_dict(
    value: dict[str, Any], schema: type, base: Path, context: dict[str, str], where: str
) -> dict[str, Any]:
    kinds = {f.name: f.metadata.get("path") for f in dataclasses.fields(schema)}
    local = dict(context)
    for key in SHARED_KEYS:
        if isinstance(value.get(key), str) and value[key]:
            local[key] = _resolve_value(value[key], PATH_CWD, base, local, f"{where}.{key}")
    out = dict(value)
    for key, item in value.items():
        if kinds.get(key) is not None and isinstance(item, str):
            out[key] = local[key] if key in SHARED_KEYS else _resolve_value(
                item, kinds[key], base, local, f"{where}.{key}"
            )
    return out


def _resolve_value(value: str, kind: str, base: Path, context: dict[str, str], where: str) -> str:
    if not value:
        return value
    if RUN_DIR_TEMPLATE in value:
        if "run_dir" not in context:
            raise ConfigError(f"{where}: {value!r} uses {RUN_DIR_TEMPLATE} but this config has no run_dir")
        value = value.replace(RUN_DIR_TEMPLATE, context["run_dir"])
    if kind == PATH_MODEL and not is_local_model(value, base):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return os.path.normpath(p)
    anchor = Path(context["data_root"]) if kind == PATH_DATA and context.get("data_root") else base
    return os.path.normpath(anchor / p)


def resolve_against(base: Path, p: str | os.PathLike[str]) -> Path:
    """`p` if absolute, else `base / p`: a PATH_DATA value that `require_absolute` let stay relative
    (a section's `instructions` under its parent's data_root) resolved where a step uses it."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


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
    parser.add_argument("overrides", nargs="*", help="key=value overrides (see the keys below), e.g. out_dir=runs/x")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides, section=section)


def require_absolute(cfg: Any, where: str = "", data_root: str = "") -> None:
    """Refuse a config whose directory-relative path fields are still relative.

    Library entry points call this: below the config layer every PATH_CWD field and every local
    PATH_MODEL field is absolute (`load_config` / `resolve_paths` make them so). PATH_DATA fields
    may stay relative only when `data_root` is set, which then anchors them; a nested section
    without its own data_root takes its parent's (SHARED_KEYS).

    Raises ConfigError naming the field and value.
    """
    name = where or type(cfg).__name__
    data_root = getattr(cfg, "data_root", "") or data_root
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.metadata.get("path")
        if dataclasses.is_dataclass(value):
            require_absolute(value, f"{name}.{f.name}", data_root)
        if kind is None or not isinstance(value, str) or not value:
            continue
        if kind == PATH_MODEL and not is_local_model(value, Path.cwd()):
            continue
        if kind == PATH_DATA and data_root and RUN_DIR_TEMPLATE not in value:
            continue
        if not Path(value).is_absolute():
            raise ConfigError(
                f"{name}.{f.name}={value!r} is relative; library calls take absolute paths "
                "(build configs with load_config or resolve_paths)"
            )
