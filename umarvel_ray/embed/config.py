"""The embedding job's settings: `EmbedConfig`, its validation, and the fingerprint a restart checks.

`validate_config` resolves every path and the pixel budget before any Ray work starts;
`settings_fingerprint` is everything that must match for the shards of an earlier run to be reused
(it is stored as the manifest's and the progress file's `settings`). The `model_*` helpers read
what the job needs to know about the embedder (pixel budget, identity, vector size) without
loading its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, resolve_against
from umarvel_ray.embed.decode import KINDS, InputIndex
from umarvel_ray.io import dir_signature

FORMAT_VERSION = 1

@dataclass
class EmbedConfig:
    """Settings of one embedding job (`jobs/embed.py --config CFG key=value ...`)."""

    input: str = field(
        default="", metadata={"path": "data", "help": "M-BEIR jsonl to embed (absolute, or relative to data_root)"}
    )
    data_root: str = field(
        default="", metadata={"path": "cwd", "help": "M-BEIR root: image paths and the instructions tsv resolve against it"}
    )
    kind: str = field(default="candidate", metadata={"help": "candidate | query"})
    model: str = field(default="", metadata={"path": "model", "help": "embedder model directory (merged checkpoint)"})
    adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional LoRA adapter directory"})
    output_dir: str = field(default="", metadata={"path": "cwd", "help": "where part-*.parquet + manifest.json go"})
    instructions: str = field(
        default="instructions/query_instructions.tsv",
        metadata={"path": "data", "help": "query instruction tsv (relative to data_root unless absolute)"},
    )
    prompt_index: int | None = field(
        default=None,
        metadata={"help": "queries: fixed prompt index (0-3); null draws one per query, seeded by qid"},
    )
    instruction_seed: int = field(default=0, metadata={"help": "seed of the per-query instruction draw"})
    shard_rows: int = field(default=10000, metadata={"help": "input lines per output shard (restart unit)"})
    chunk_rows: int = field(
        default=128, metadata={"help": "input lines per CPU task; model batches never span chunks"}
    )
    batch_size: int = field(default=32, metadata={"help": "rows per model forward"})
    collate_in: str = field(
        default="tasks",
        metadata={"help": "tasks: CPU tasks collate, actors only run the model | actor: actors collate"},
    )
    num_actors: int = field(
        default=0,
        metadata={
            "help": "embedder actors; 0 = one per GPU, or 1 on CPU (CPU-only nodes do best with one per "
            "core: actor_num_cpus=0.5 decode_num_cpus=0.5 torch_threads=1 collate_in=actor)"
        },
    )
    actor_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per embedder actor"})
    decode_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per decode task"})
    decode_memory_mb: int = field(
        default=1024, metadata={"help": "memory reserved per decode task (MiB); also prevents stage fusion"}
    )
    max_decode_tasks: int = field(
        default=0, metadata={"help": "cap on concurrent decode tasks; 0 = Ray decides"}
    )
    torch_threads: int = field(
        default=0, metadata={"help": "torch intra-op threads per actor; 0 = max(1, int(actor_num_cpus))"}
    )
    use_gpu: str = field(default="auto", metadata={"help": "auto (if the cluster has GPUs) | true | false"})
    dtype: str | None = field(default=None, metadata={"help": "model dtype override (float32|bfloat16|auto)"})
    min_pixels: int | None = field(default=None, metadata={"help": "image budget; null = the model's"})
    max_pixels: int | None = field(default=None, metadata={"help": "image budget; null = the model's"})
    text_rule: str = field(
        default="uniir",
        metadata={
            "help": "query and candidate text: uniir (UniIR's format_string: drop CR, strip spaces and "
            "surrounding double quotes, upper-case the first letter, end with . ? or !) | none (as is)"
        },
    )
    check_duplicates: bool = field(
        default=True,
        metadata={"help": "reject repeated ids (keeps one row per id; 12 B of driver memory per kept id)"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "discard an existing output made with other settings"}
    )
    ray_address: str | None = field(
        default=None, metadata={"help": "Ray address; null = RAY_ADDRESS or local"}
    )
    ray_progress_bars: bool = field(default=False, metadata={"help": "show Ray Data's own progress bars"})
    progress_every_s: float = field(default=10.0, metadata={"help": "seconds between progress lines"})
    fail_after_shards: int | None = field(
        default=None, metadata={"help": "testing: raise after committing this many shards in this run"}
    )


@dataclass
class ResolvedConfig:
    """An `EmbedConfig` after `validate_config`: resolved paths and the effective pixel budget."""

    input: Path
    data_root: Path
    model: Path
    output: Path
    instructions: Path | None
    min_pixels: int
    max_pixels: int


def validate_config(cfg: EmbedConfig) -> ResolvedConfig:
    """Check the config before any Ray work; raise `ConfigError` with a clear message."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {cfg.kind!r}")
    for name in ("input", "model", "output_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required (set {name}=...)")
    data_root = Path(cfg.data_root).expanduser() if cfg.data_root else None
    if data_root is not None and not data_root.is_dir():
        raise ConfigError(f"data_root is not a directory: {data_root}")
    inp = resolve_against(data_root or Path.cwd(), cfg.input)
    if not inp.is_file():
        raise ConfigError(f"input file not found: {inp}")
    if data_root is None:
        raise ConfigError("data_root is required (image paths in M-BEIR files are relative to it)")
    model = Path(cfg.model).expanduser()
    if not model.is_dir():
        raise ConfigError(f"model directory not found: {model}")
    if cfg.adapter and not Path(cfg.adapter).expanduser().is_dir():
        raise ConfigError(f"adapter directory not found: {cfg.adapter}")
    for name in ("shard_rows", "chunk_rows", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if min(cfg.num_actors, cfg.max_decode_tasks, cfg.torch_threads, cfg.decode_memory_mb) < 0:
        raise ConfigError("num_actors, max_decode_tasks, torch_threads and decode_memory_mb must be >= 0")
    if cfg.actor_num_cpus < 0 or cfg.decode_num_cpus <= 0:
        raise ConfigError("actor_num_cpus must be >= 0 and decode_num_cpus > 0")
    if cfg.collate_in not in ("tasks", "actor"):
        raise ConfigError(f"collate_in must be tasks or actor, got {cfg.collate_in!r}")
    if cfg.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"use_gpu must be auto, true or false, got {cfg.use_gpu!r}")
    from umarvel_ray.data.model_items import TEXT_RULES

    if cfg.text_rule not in TEXT_RULES:
        raise ConfigError(f"text_rule must be one of {TEXT_RULES}, got {cfg.text_rule!r}")
    instructions = None
    if cfg.kind == "query":
        instructions = resolve_against(data_root, cfg.instructions)
        if not instructions.is_file():
            raise ConfigError(f"instructions file not found: {instructions}")
        from umarvel_ray.data.instructions import read_instructions

        n_prompts = min(len(r.prompts) for r in read_instructions(instructions).rows)
        if cfg.prompt_index is not None and not 0 <= cfg.prompt_index < n_prompts:
            raise ConfigError(f"prompt_index must be in 0..{n_prompts - 1}, got {cfg.prompt_index}")
    min_px, max_px = model_pixel_budget(model, cfg.adapter)
    min_px = cfg.min_pixels if cfg.min_pixels is not None else min_px
    max_px = cfg.max_pixels if cfg.max_pixels is not None else max_px
    if not 0 < min_px <= max_px:
        raise ConfigError(f"need 0 < min_pixels <= max_pixels, got {min_px}, {max_px}")
    return ResolvedConfig(inp, data_root, model, Path(cfg.output_dir).expanduser(), instructions, min_px, max_px)


def model_pixel_budget(model_dir: Path, adapter: str | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) the embedder feeds its processor, read without loading weights.

    Same precedence as `Embedder.load`: the adapter's umarvel_embedder.json, else the model's, else
    the `InputConfig` defaults.
    """
    from umarvel_ray.model.embedder import saved_embedder_config
    from umarvel_ray.model.saved import saved_pixel_budget

    return saved_pixel_budget(saved_embedder_config(model_dir, adapter))


def model_signature(model_dir: Path, adapter: str | None) -> str:
    """A cheap identity of the weights: `dir_signature` over the model's top-level files, then the
    adapter's (one hash over both, the value earlier manifests stored)."""
    signature = dir_signature(model_dir, *([Path(adapter)] if adapter else []))
    assert signature is not None
    return signature


def model_dim(model_dir: Path) -> int:
    """Embedding size (the language model's hidden size) from config.json, without weights."""
    from umarvel_ray.model.backbone import load_config

    return int(load_config(model_dir).get_text_config().hidden_size)


def settings_fingerprint(cfg: EmbedConfig, res: ResolvedConfig, index: InputIndex) -> dict[str, Any]:
    """Everything that must match for shards of an earlier run to be reused."""
    instruction: dict[str, Any] | None = None
    if cfg.kind == "query":
        instruction = {
            "file": str(res.instructions),
            "mode": "fixed" if cfg.prompt_index is not None else "random",
            "prompt_index": cfg.prompt_index,
            "seed": cfg.instruction_seed if cfg.prompt_index is None else None,
        }
    return {
        "format": FORMAT_VERSION,
        "kind": cfg.kind,
        "input": str(res.input),
        "input_sha256": index.sha256,
        "input_bytes": index.size,
        "data_root": str(res.data_root),
        "model": str(res.model),
        "adapter": cfg.adapter,
        "model_signature": model_signature(res.model, cfg.adapter),
        "model_dtype": cfg.dtype,
        "shard_rows": cfg.shard_rows,
        "instruction": instruction,
        "pixels": {"min": res.min_pixels, "max": res.max_pixels},
        "text_rule": cfg.text_rule,
        "check_duplicates": cfg.check_duplicates,
    }


def model_overrides(cfg: EmbedConfig, res: ResolvedConfig) -> dict[str, Any]:
    """`cfg_overrides` for `Embedder.load`, shared by the actors and the collating CPU tasks:
    the dtype override and the pixel budget the decode stage resized under."""
    out: dict[str, Any] = {"inputs": {"min_pixels": res.min_pixels, "max_pixels": res.max_pixels}}
    if cfg.dtype:
        out["dtype"] = cfg.dtype
    return out


__all__ = [
    "FORMAT_VERSION",
    "EmbedConfig",
    "ResolvedConfig",
    "model_dim",
    "model_overrides",
    "model_pixel_budget",
    "model_signature",
    "settings_fingerprint",
    "validate_config",
]
