"""Embed an M-BEIR candidate pool or query file with Ray Data into restartable parquet shards.

Pipeline (one Ray Data dataset, streaming):

    chunk descriptors (driver, `decode.index_input`)
      -> `decode.decode_chunks`: CPU tasks parse lines, build items, decode + resize images
      -> `EmbedActor`: an actor pool, one model load per actor, `batch_size` rows per forward
      -> driver: `iter_batches` in streaming order, rows grouped by shard, a shard flushed the
         moment all its rows (embedded or rejected) have arrived

Why the driver writes the shards (and not a Datasink): a shard is a fixed range of input lines,
but Ray Data blocks do not respect shard boundaries, so no single write task ever sees a whole
shard; a Datasink would need cross-task coordination to know when a shard is complete. The driver
sees every row anyway through `iter_batches`, knows each shard's expected row count from the index
pass, and can commit a shard atomically (rejects file, then parquet via tmp + rename, then the
progress manifest) exactly when it is complete. Only incomplete shards are buffered, so driver
memory is bounded by the rows in flight, not by the pool; the vectors that pass through the driver
are small next to model compute (a 3584-d float32 vector is 14 KB per row). The one per-row
record that outlives a shard is the duplicate check's 12 B per kept id (`commit`, `dedup`: a
numpy hash + shard number, no Python object per row). Ray Data's own
row-id checkpointing (`DataContext.checkpoint_config`, beta) was not used: it needs a shared
checkpoint path plus filter actors, and cannot give the fixed, verifiable per-shard layout below.

Restart: the input is split into deterministic shards of `shard_rows` consecutive lines. While
running, `_progress.json` lists the committed shards (rows in/out/rejected, file size); the final
`manifest.json` is written last and marks the directory complete (embedstore's convention). A
rerun with the same fingerprint (input sha256, model files, kind, shard size, instruction and
pixel settings) verifies every listed shard (parquet footer readable, row count, dim, file size,
rejects file) and recomputes only shards that are missing or fail the check; stale temp files are
removed. Rows are therefore written exactly once per input id, however often the job is killed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.embed import decode
from umarvel_ray.embed.commit import (
    REJECTS_DIR,
    RESULT_COLUMNS,
    InjectedFailure,
    ShardCommitter,
    rejects_path,
)
from umarvel_ray.embed.decode import KINDS, InputIndex, ShardSpec
from umarvel_ray.embed.dedup import CommittedIds
from umarvel_ray.io import atomic_write_json

log = logging.getLogger("umarvel_ray.embed")

PROGRESS_NAME = "_progress.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT_VERSION = 1
MAX_INPUT_BLOCKS = 4096


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
class EmbedResult:
    """What one `run_embedding` call produced."""

    output_dir: Path
    rows_in: int
    rows_out: int
    rows_rejected: int
    dim: int
    seconds: float
    shards_written: int = 0
    shards_skipped: int = 0
    summary: str = ""
    first_result_s: float | None = None  # start -> first embedded batch at the driver (startup cost)
    rows_at_first_result: int = 0  # rows in that first batch
    bookkeeping_cpu_s: float = 0.0  # driver CPU of buffering, duplicate checks and commits
    peak_buffered_rows: int = 0  # most rows the driver held at once in incomplete shards

    @property
    def rows_per_s_after_startup(self) -> float | None:
        """Throughput once the first batch is out: what a long job runs at, without the fixed
        start-up (worker processes, imports, model loads) that a short job is dominated by."""
        if self.first_result_s is None or self.seconds - self.first_result_s <= 0:
            return None
        return (self.rows_in - self.rows_at_first_result) / (self.seconds - self.first_result_s)


# ---------------------------------------------------------------------------------------------
# Validation and fingerprint
# ---------------------------------------------------------------------------------------------


@dataclass
class _Resolved:
    input: Path
    data_root: Path
    model: Path
    output: Path
    instructions: Path | None
    min_pixels: int
    max_pixels: int


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def validate_config(cfg: EmbedConfig) -> _Resolved:
    """Check the config before any Ray work; raise `ConfigError` with a clear message."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {cfg.kind!r}")
    for name in ("input", "model", "output_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required (set {name}=...)")
    data_root = Path(cfg.data_root).expanduser() if cfg.data_root else None
    if data_root is not None and not data_root.is_dir():
        raise ConfigError(f"data_root is not a directory: {data_root}")
    inp = _resolve(data_root or Path.cwd(), cfg.input)
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
    from umarvel_ray.data.mbeir import TEXT_RULES

    if cfg.text_rule not in TEXT_RULES:
        raise ConfigError(f"text_rule must be one of {TEXT_RULES}, got {cfg.text_rule!r}")
    instructions = None
    if cfg.kind == "query":
        instructions = _resolve(data_root, cfg.instructions)
        if not instructions.is_file():
            raise ConfigError(f"instructions file not found: {instructions}")
        from umarvel_ray.data.mbeir import read_instructions

        n_prompts = min(len(r.prompts) for r in read_instructions(instructions).rows)
        if cfg.prompt_index is not None and not 0 <= cfg.prompt_index < n_prompts:
            raise ConfigError(f"prompt_index must be in 0..{n_prompts - 1}, got {cfg.prompt_index}")
    min_px, max_px = model_pixel_budget(model, cfg.adapter)
    min_px = cfg.min_pixels if cfg.min_pixels is not None else min_px
    max_px = cfg.max_pixels if cfg.max_pixels is not None else max_px
    if not 0 < min_px <= max_px:
        raise ConfigError(f"need 0 < min_pixels <= max_pixels, got {min_px}, {max_px}")
    return _Resolved(inp, data_root, model, Path(cfg.output_dir).expanduser(), instructions, min_px, max_px)


def model_pixel_budget(model_dir: Path, adapter: str | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) the embedder feeds its processor, read without loading weights.

    Same precedence as `Embedder.load`: the adapter's umarvel_embedder.json, else the model's, else
    the `InputConfig` defaults.
    """
    from umarvel_ray.model.saved import saved_embedder_config, saved_pixel_budget

    return saved_pixel_budget(saved_embedder_config(model_dir, adapter))


def model_signature(model_dir: Path, adapter: str | None) -> str:
    """A cheap identity of the weights: names, sizes and mtimes of the model's top-level files."""
    h = hashlib.sha256()
    for d in [model_dir] + ([Path(adapter)] if adapter else []):
        for p in sorted(d.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def model_dim(model_dir: Path) -> int:
    """Embedding size (the language model's hidden size) from config.json, without weights."""
    from umarvel_ray.model.backbone import load_config

    return int(load_config(model_dir).get_text_config().hidden_size)


def _settings(cfg: EmbedConfig, res: _Resolved, index: InputIndex) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Output directory state (manifest, progress, verification)
# ---------------------------------------------------------------------------------------------


def _verify_shard(out: Path, entry: dict[str, Any], spec: ShardSpec, dim: int | None) -> str | None:
    """None when a committed shard is intact and matches the index, else why it is not."""
    import pyarrow.parquet as pq

    if entry.get("rows_in") != spec.rows_in or entry.get("first_line") != spec.first_line:
        return "manifest entry does not match the input layout"
    if entry["rows_in"] != entry.get("rows_out", -1) + entry.get("rows_rejected", -1):
        return "manifest entry rows do not add up"
    path = out / spec.name
    if not path.is_file():
        return "shard file missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"shard file size {path.stat().st_size} != {entry.get('bytes')}"
    try:
        pf = pq.ParquetFile(path)
        n, vdim = pf.metadata.num_rows, pf.schema_arrow.field("vector").type.list_size
    except Exception as exc:  # noqa: BLE001 - any unreadable file means "recompute"
        return f"unreadable shard: {exc}"
    if n != entry["rows_out"]:
        return f"shard has {n} rows, manifest says {entry['rows_out']}"
    if dim is not None and vdim != dim:
        return f"shard dim {vdim} != {dim}"
    rej = rejects_path(out, spec.name)
    if not rej.is_file():
        return "rejects file missing"
    with rej.open("rb") as f:
        n_rej = sum(1 for line in f if line.strip())
    if n_rej != entry["rows_rejected"]:
        return f"rejects file has {n_rej} rows, manifest says {entry['rows_rejected']}"
    return None


def _load_state(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any], bool]:
    """The previous run's state (manifest or progress) if its settings match, else a fresh one."""
    from umarvel_ray.store import MANIFEST_NAME

    for name in (MANIFEST_NAME, PROGRESS_NAME):
        p = out / name
        if not p.is_file():
            continue
        try:
            state = json.loads(p.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", p)
            continue
        if state.get("settings") == settings:
            shards = state.get("shards") or {}
            if isinstance(shards, list):  # the final manifest lists shards in order
                shards = {e["name"]: e for e in shards}
            return {"settings": settings, "dim": state.get("dim"), "shards": shards}, True
        if not overwrite:
            diff = sorted(
                k
                for k in set(settings) | set(state.get("settings", {}))
                if settings.get(k) != state.get("settings", {}).get(k)
            )
            raise ConfigError(
                f"{out} holds embeddings made with other settings (differs in {diff}); "
                "use another output_dir or overwrite=true"
            )
        break
    return {"settings": settings, "dim": None, "shards": {}}, False


def _clean_output(out: Path) -> None:
    """Remove every artefact this pipeline writes (overwrite=true or settings changed)."""
    from umarvel_ray.store import MANIFEST_NAME, SHARD_GLOB

    for p in out.glob(SHARD_GLOB):
        p.unlink()
    for name in (MANIFEST_NAME, PROGRESS_NAME, REJECTS_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / REJECTS_DIR, ignore_errors=True)


def _remove_temp_files(out: Path) -> int:
    """Temp files of killed writers (`.<name>.tmp-<pid>`); no other writer owns this directory."""
    n = 0
    for d in (out, out / REJECTS_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# The model stage
# ---------------------------------------------------------------------------------------------

def reject_non_finite(vectors: np.ndarray, meta: dict[str, np.ndarray]) -> int:
    """Reject (field "vector") every not yet rejected row whose vector has a NaN or an inf.

    An fp16/bf16 overflow gives such vectors; faiss then never returns them and torch ranks them
    first, so they must never reach an index. Their vector is zeroed; returns how many.
    """
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1) & (meta["reject_field"] == ""))
    for i in bad:
        n_bad = int((~np.isfinite(vectors[i])).sum())
        meta["reject_field"][i] = "vector"
        meta["reject_reason"][i] = f"embedding is not finite ({n_bad} of {vectors.shape[1]} values NaN or inf)"
        vectors[i] = 0.0
    return len(bad)


class EmbedActor:
    """Ray Data actor: loads the embedder once and embeds the groups made by `decode_chunks`.

    A group's payload is either an already collated batch (only the forward pass runs here) or
    items with uint8 images (collated here). Rejected rows pass through with a zero vector. For
    item payloads a failing batch is retried row by row and only the failing rows are rejected
    (field "<model>"); a row whose vector is not finite is rejected (field "vector"); if every row fails alone the error is systemic (wrong model, device lost)
    and is raised instead of silently rejecting the pool. A failing collated batch is raised too.
    """

    def __init__(
        self,
        model: str,
        kind: str,
        adapter: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        torch_threads: int = 1,
        use_gpu: bool = False,
    ):
        import torch

        from umarvel_ray.model.embedder import Embedder
        from umarvel_ray.progress import quiet_known_noise

        quiet_known_noise()

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.embedder = Embedder.load(model, adapter=adapter, cfg_overrides=model_overrides or None)
        if use_gpu and torch.cuda.is_available():
            self.embedder.to("cuda")
        self.embedder.eval()
        self.is_query = kind == "query"
        self.dim = int(self.embedder.dim)

    @classmethod
    def from_embedder(cls, embedder: Any, kind: str) -> EmbedActor:
        """An actor around an embedder already loaded and placed (benchmarks: a random-weight model
        has no directory to load from). Same per-batch path as an actor Ray Data constructs."""
        actor = cls.__new__(cls)
        actor.embedder, actor.is_query, actor.dim = embedder.eval(), kind == "query", int(embedder.dim)
        return actor

    def _forward(self, batch: dict[str, Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.embedder(batch).float().cpu().numpy()

    def _from_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        batch = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}
        return self._forward(batch)

    def _from_items(
        self, items: list[dict[str, Any]], meta: dict[str, np.ndarray], ok: np.ndarray
    ) -> np.ndarray:
        try:
            return self._forward(self.embedder.collate(items, is_query=self.is_query))
        except Exception as batch_exc:  # noqa: BLE001 - isolate the bad rows below
            out = np.zeros((len(items), self.dim), np.float32)
            failed = 0
            for j, item in enumerate(items):
                try:
                    out[j] = self._forward(self.embedder.collate([item], is_query=self.is_query))[0]
                except Exception as exc:  # noqa: BLE001
                    failed += 1
                    meta["reject_field"][ok[j]] = "<model>"
                    meta["reject_reason"][ok[j]] = f"embedding failed: {type(exc).__name__}: {exc}"
            if failed == len(items):
                raise batch_exc
            return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        for meta_blob, payload_blob in zip(batch["meta"], batch["payload"], strict=True):
            meta, payload = decode.unpack_group(meta_blob, payload_blob)
            meta = {k: np.array(v, dtype=object if v.dtype == object else v.dtype) for k, v in meta.items()}
            vectors = np.zeros((len(meta["shard"]), self.dim), dtype=np.float32)
            ok = np.flatnonzero(meta["reject_field"] == "")
            if payload is not None and len(ok):
                if "collated" in payload:
                    vectors[ok] = self._from_arrays(payload["collated"])
                else:
                    vectors[ok] = self._from_items(payload["items"], meta, ok)
                reject_non_finite(vectors, meta)
            parts.append({**meta, "vector": vectors})
        if not parts:
            return {k: np.zeros(0, object) for k in RESULT_COLUMNS[:-1]} | {
                "vector": np.zeros((0, self.dim), np.float32)
            }
        return {k: np.concatenate([p[k] for p in parts]) for k in RESULT_COLUMNS}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _use_gpu(cfg: EmbedConfig) -> bool:
    from umarvel_ray.runtime import cluster_gpus

    if cfg.use_gpu == "false":
        return False
    gpus = cluster_gpus()
    if cfg.use_gpu == "true" and gpus < 1:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPU")
    return gpus >= 1


def model_overrides(cfg: EmbedConfig, res: _Resolved) -> dict[str, Any]:
    """`cfg_overrides` for `Embedder.load`, shared by the actors and the collating CPU tasks:
    the dtype override and the pixel budget the decode stage resized under."""
    out: dict[str, Any] = {"inputs": {"min_pixels": res.min_pixels, "max_pixels": res.max_pixels}}
    if cfg.dtype:
        out["dtype"] = cfg.dtype
    return out


def build_dataset(
    cfg: EmbedConfig, res: _Resolved, pending: list[ShardSpec], use_gpu: bool, embed_stage: type | None = None
) -> Any:
    """The lazy Ray Data pipeline over the pending shards (decode tasks -> embedder actors)."""
    import ray.data

    from umarvel_ray.runtime import actor_pool, cluster_gpus, task_pool

    records = decode.chunk_records(pending)
    overrides = model_overrides(cfg, res)
    # One block per chunk keeps decode parallelism fine-grained; past MAX_INPUT_BLOCKS (huge pools)
    # a decode task handles several consecutive chunks instead of flooding the object store.
    ds = ray.data.from_items(records, override_num_blocks=min(len(records), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(
        decode.decode_chunks,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "input_path": str(res.input),
            "kind": cfg.kind,
            "data_root": str(res.data_root),
            "batch_size": cfg.batch_size,
            "collate": cfg.collate_in == "tasks",
            "model": str(res.model),
            "adapter": cfg.adapter,
            "model_overrides": overrides,
            "instructions_path": str(res.instructions) if res.instructions else None,
            "prompt_index": cfg.prompt_index,
            "seed": cfg.instruction_seed,
            "min_pixels": res.min_pixels,
            "max_pixels": res.max_pixels,
            "text_rule": cfg.text_rule,
        },
        num_cpus=cfg.decode_num_cpus,
        # A memory reservation also makes the remote args differ from the actors', which keeps
        # Ray Data from fusing decode into the actor stage (decode and model would run in series).
        memory=cfg.decode_memory_mb * 1024 * 1024 or None,
        **task_pool(cfg.max_decode_tasks or None),
    )
    n_actors = cfg.num_actors or (max(1, int(cluster_gpus())) if use_gpu else 1)
    threads = cfg.torch_threads or (0 if use_gpu else max(1, int(cfg.actor_num_cpus)))
    return ds.map_batches(
        embed_stage or EmbedActor,
        fn_constructor_kwargs={
            "model": str(res.model),
            "kind": cfg.kind,
            "adapter": cfg.adapter,
            "model_overrides": overrides,
            "torch_threads": threads,
            "use_gpu": use_gpu,
        },
        batch_size=1,  # one group = one model batch, formed by the CPU stage
        batch_format="numpy",
        num_cpus=cfg.actor_num_cpus,
        num_gpus=1 if use_gpu else 0,
        **actor_pool(n_actors, n_actors),
    )


def _iter_results(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def _finalize(
    out: Path, state: dict[str, Any], index: InputIndex, kind: str, res: _Resolved
) -> dict[str, Any]:
    """Write rejects.jsonl (all shards, in order) and manifest.json (last); drop the progress file."""
    from umarvel_ray.store import write_manifest

    entries = [state["shards"][s.name] for s in index.shards]
    tmp = out / f".{REJECTS_NAME}.tmp-{os.getpid()}"
    with tmp.open("wb") as f:
        for s in index.shards:
            f.write(rejects_path(out, s.name).read_bytes())
    os.replace(tmp, out / REJECTS_NAME)
    settings = state["settings"]
    manifest = {
        "model": settings["model"],
        "dim": state["dim"],
        "dtype": "float32",
        "kind": kind,
        "input": str(res.input),
        "rows_in": sum(e["rows_in"] for e in entries),
        "rows_out": sum(e["rows_out"] for e in entries),
        "rows_rejected": sum(e["rows_rejected"] for e in entries),
        "shards": entries,
        "instruction": settings["instruction"],
        "settings": settings,
        "complete": True,
    }
    write_manifest(out, manifest)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def run_embedding(cfg: EmbedConfig, embed_stage: type | None = None) -> EmbedResult:
    """Embed `cfg.input` into `cfg.output_dir`, skipping shards an earlier run already finished.

    `embed_stage` replaces `EmbedActor` as the model stage (same constructor and batch contract);
    only benchmarks of the pipeline itself use it (`scale_bench`'s named stand-in).
    """
    require_absolute(cfg)

    from umarvel_ray.progress import summary
    from umarvel_ray.store import MANIFEST_NAME

    t0 = time.perf_counter()
    res = validate_config(cfg)
    index = decode.index_input(res.input, cfg.shard_rows, cfg.chunk_rows)
    out = res.output
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, res, index)
    state, resumed = _load_state(out, settings, cfg.overwrite)
    if not resumed:
        _clean_output(out)
    state["dim"] = model_dim(res.model)
    n_tmp = _remove_temp_files(out)
    done: list[ShardSpec] = []
    pending: list[ShardSpec] = []
    for spec in index.shards:
        entry = state["shards"].get(spec.name)
        why = "not committed" if entry is None else _verify_shard(out, entry, spec, state["dim"])
        if why is None:
            done.append(spec)
        else:
            if entry is not None:
                log.warning("recomputing %s: %s", spec.name, why)
            state["shards"].pop(spec.name, None)
            pending.append(spec)
    log.info(
        "embed %s %s: %d rows in %d shards; %d shards done, %d to do%s",
        cfg.kind,
        res.input,
        index.rows_in,
        len(index.shards),
        len(done),
        len(pending),
        f" (removed {n_tmp} temp files)" if n_tmp else "",
    )
    save_config(cfg, out)
    first_result_s: float | None = None
    first_rows = 0
    bookkeeping_cpu_s, peak_buffered = 0.0, 0
    if pending:
        # The directory is incomplete from here on: progress file only, no manifest.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        atomic_write_json(out / PROGRESS_NAME, state)
        seen = CommittedIds.from_shards(out, [s.index for s in done]) if cfg.check_duplicates else None
        committer = ShardCommitter(
            out,
            state,
            {s.index: s for s in pending},
            res.input,
            cfg.kind,
            seen,
            out / PROGRESS_NAME,
            cfg.fail_after_shards,
        )
        if any(s.rows_in for s in pending):
            first, first_rows = _run_ray(cfg, res, pending, committer, embed_stage)
            first_result_s = None if first is None else first - t0
        committer.commit_empty()
        bookkeeping_cpu_s, peak_buffered = committer.cpu_s, committer.peak_buffered
        if committer.buffers:
            missing = {decode.shard_name(s): (b.received, b.expected) for s, b in committer.buffers.items()}
            raise RuntimeError(f"pipeline ended with incomplete shards (received, expected): {missing}")
    manifest = _finalize(out, state, index, cfg.kind, res)
    seconds = time.perf_counter() - t0
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    line = summary(
        f"embed {cfg.kind}",
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_rejected=manifest["rows_rejected"],
        shards=len(index.shards),
        shards_written=len(pending),
        shards_skipped=len(done),
        dim=manifest["dim"],
        seconds=f"{seconds:.1f}",
        rows_per_s=f"{sum(s.rows_in for s in pending) / max(seconds, 1e-9):.1f}",
        output=str(out),
    )
    return EmbedResult(
        output_dir=out,
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_rejected=manifest["rows_rejected"],
        dim=manifest["dim"],
        seconds=seconds,
        shards_written=len(pending),
        shards_skipped=len(done),
        summary=line,
        first_result_s=first_result_s,
        rows_at_first_result=first_rows,
        bookkeeping_cpu_s=bookkeeping_cpu_s,
        peak_buffered_rows=peak_buffered,
    )


def _run_ray(
    cfg: EmbedConfig,
    res: _Resolved,
    pending: list[ShardSpec],
    committer: ShardCommitter,
    embed_stage: type | None = None,
) -> tuple[float | None, int]:
    """Run the Ray Data pipeline over `pending`, feeding every result batch to `committer`.

    Returns the `time.perf_counter()` at which the first result batch arrived (None if none did)
    and that batch's row count.
    """
    from ray.data import DataContext

    from umarvel_ray.progress import Progress
    from umarvel_ray.runtime import ensure_ray

    ensure_ray(cfg.ray_address)
    use_gpu = _use_gpu(cfg)
    ctx = DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = cfg.ray_progress_bars
    total = sum(s.rows_in for s in pending)
    progress = Progress(f"embed {cfg.kind}", total=total, every_s=cfg.progress_every_s)
    first: float | None = None
    first_rows = 0
    it = _iter_results(build_dataset(cfg, res, pending, use_gpu, embed_stage or EmbedActor))
    try:
        for batch in it:
            if first is None:
                first, first_rows = time.perf_counter(), len(batch["shard"])
            committer.add(batch)
            progress.update(len(batch["shard"]))
    finally:
        it.close()
        ctx.enable_progress_bars = old_bars
    return first, first_rows


__all__ = ["EmbedActor", "EmbedConfig", "EmbedResult", "InjectedFailure", "run_embedding", "validate_config"]
