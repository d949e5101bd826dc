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
`manifest.json` is written last and marks the directory complete (the store's convention,
`umarvel_ray/store.py`). A rerun with the same fingerprint (`config.settings_fingerprint`: input
sha256, model files, kind, shard size, instruction and pixel settings) verifies every listed shard
(parquet footer readable, row count, dim, file size, rejects file) and recomputes only shards that
are missing or fail the check; stale temp files are removed (`commit.py` holds this restart
contract). Rows are therefore written exactly once per input id, however often the job is killed.

Modules: `config` (settings, validation, fingerprint), `decode` (the CPU stage), `actor` (the model
stage), `commit` (shard commits and the restart contract), `dedup` (duplicate ids), this module
(the dataset and the driver's steps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.embed import decode
from umarvel_ray.embed.actor import EmbedActor
from umarvel_ray.embed.commit import (
    PROGRESS_NAME,
    ShardCommitter,
    clean_output,
    finalize,
    load_state,
    remove_temp_files,
    verify_shard,
)
from umarvel_ray.embed.config import (
    EmbedConfig,
    ResolvedConfig,
    model_dim,
    model_overrides,
    settings_fingerprint,
    validate_config,
)
from umarvel_ray.embed.decode import InputIndex, ShardSpec
from umarvel_ray.embed.dedup import CommittedIds
from umarvel_ray.io import atomic_write_json
from umarvel_ray.store import remove_manifest, shard_name

log = logging.getLogger("umarvel_ray.embed")

MAX_INPUT_BLOCKS = 4096


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



@dataclass
class _Plan:
    """The output directory after the restart check: its state and the shards done or still to do."""

    state: dict[str, Any]
    done: list[ShardSpec]
    pending: list[ShardSpec]


@dataclass
class _RunStats:
    """Timings of the Ray part of one run (all zero / None when no shard was pending)."""

    first_result_s: float | None = None
    first_rows: int = 0
    bookkeeping_cpu_s: float = 0.0
    peak_buffered: int = 0


def _use_gpu(cfg: EmbedConfig) -> bool:
    from umarvel_ray.runtime import cluster_gpus

    if cfg.use_gpu == "false":
        return False
    gpus = cluster_gpus()
    if cfg.use_gpu == "true" and gpus < 1:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPU")
    return gpus >= 1


def build_dataset(
    cfg: EmbedConfig,
    res: ResolvedConfig,
    pending: list[ShardSpec],
    use_gpu: bool,
    embed_stage: type | None = None,
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



def _split_shards(
    out: Path, state: dict[str, Any], index: InputIndex
) -> tuple[list[ShardSpec], list[ShardSpec]]:
    """(done, pending): a shard the state lists is skipped only if it passes `verify_shard`; one
    that fails is dropped from the state so that it is recomputed."""
    done: list[ShardSpec] = []
    pending: list[ShardSpec] = []
    for spec in index.shards:
        entry = state["shards"].get(spec.name)
        why = "not committed" if entry is None else verify_shard(out, entry, spec, state["dim"])
        if why is None:
            done.append(spec)
        else:
            if entry is not None:
                log.warning("recomputing %s: %s", spec.name, why)
            state["shards"].pop(spec.name, None)
            pending.append(spec)
    return done, pending


def _prepare_output(cfg: EmbedConfig, res: ResolvedConfig, index: InputIndex) -> _Plan:
    """Take over the output directory: resume the previous run's state when its settings
    fingerprint matches (else start clean), remove killed writers' temp files, and split the
    shards into verified-done and pending. Saves the config next to the shards."""
    out = res.output
    out.mkdir(parents=True, exist_ok=True)
    state, resumed = load_state(out, settings_fingerprint(cfg, res, index), cfg.overwrite)
    if not resumed:
        clean_output(out)
    state["dim"] = model_dim(res.model)
    n_tmp = remove_temp_files(out)
    done, pending = _split_shards(out, state, index)
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
    return _Plan(state, done, pending)


def _embed_pending(
    cfg: EmbedConfig, res: ResolvedConfig, plan: _Plan, t0: float, embed_stage: type | None
) -> _RunStats:
    """Embed and commit the pending shards. The directory is incomplete meanwhile (progress file,
    no manifest), so a reader never takes a half-written pool for a finished one."""
    stats = _RunStats()
    if not plan.pending:
        return stats
    out = res.output
    remove_manifest(out)
    atomic_write_json(out / PROGRESS_NAME, plan.state)
    seen = CommittedIds.from_shards(out, [s.index for s in plan.done]) if cfg.check_duplicates else None
    committer = ShardCommitter(
        out,
        plan.state,
        {s.index: s for s in plan.pending},
        res.input,
        cfg.kind,
        seen,
        out / PROGRESS_NAME,
        cfg.fail_after_shards,
    )
    if any(s.rows_in for s in plan.pending):
        first, stats.first_rows = _run_ray(cfg, res, plan.pending, committer, embed_stage)
        stats.first_result_s = None if first is None else first - t0
    committer.commit_empty()
    stats.bookkeeping_cpu_s, stats.peak_buffered = committer.cpu_s, committer.peak_buffered
    if committer.buffers:
        missing = {shard_name(s): (b.received, b.expected) for s, b in committer.buffers.items()}
        raise RuntimeError(f"pipeline ended with incomplete shards (received, expected): {missing}")
    return stats


def _report(
    cfg: EmbedConfig, out: Path, manifest: dict[str, Any], plan: _Plan, seconds: float, stats: _RunStats
) -> EmbedResult:
    """Log the SUMMARY line and build the result from the final manifest."""
    from umarvel_ray.progress import summary

    line = summary(
        f"embed {cfg.kind}",
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_rejected=manifest["rows_rejected"],
        shards=len(plan.done) + len(plan.pending),
        shards_written=len(plan.pending),
        shards_skipped=len(plan.done),
        dim=manifest["dim"],
        seconds=f"{seconds:.1f}",
        rows_per_s=f"{sum(s.rows_in for s in plan.pending) / max(seconds, 1e-9):.1f}",
        output=str(out),
    )
    return EmbedResult(
        output_dir=out,
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_rejected=manifest["rows_rejected"],
        dim=manifest["dim"],
        seconds=seconds,
        shards_written=len(plan.pending),
        shards_skipped=len(plan.done),
        summary=line,
        first_result_s=stats.first_result_s,
        rows_at_first_result=stats.first_rows,
        bookkeeping_cpu_s=stats.bookkeeping_cpu_s,
        peak_buffered_rows=stats.peak_buffered,
    )


def run_embedding(cfg: EmbedConfig, embed_stage: type | None = None) -> EmbedResult:
    """Embed `cfg.input` into `cfg.output_dir`, skipping shards an earlier run already finished.

    `embed_stage` replaces `EmbedActor` as the model stage (same constructor and batch contract);
    only benchmarks of the pipeline itself use it (`scale_bench`'s named stand-in).
    """
    require_absolute(cfg)
    t0 = time.perf_counter()
    res = validate_config(cfg)
    index = decode.index_input(res.input, cfg.shard_rows, cfg.chunk_rows)
    plan = _prepare_output(cfg, res, index)
    stats = _embed_pending(cfg, res, plan, t0, embed_stage)
    manifest = finalize(res.output, plan.state, index, cfg.kind, res.input)
    seconds = time.perf_counter() - t0
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    return _report(cfg, res.output, manifest, plan, seconds, stats)


def _run_ray(
    cfg: EmbedConfig,
    res: ResolvedConfig,
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


__all__ = ["EmbedResult", "build_dataset", "run_embedding"]
