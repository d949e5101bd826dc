"""What an M-BEIR evaluation will do, decided before anything is embedded.

    EvalConfig                      the job's settings (SearchOptions + a nested `embed` section)
    plan_tasks(cfg) -> EvalPlan     which tasks / pools can be evaluated (missing files = skipped),
                                    query and qrels files validated
    pool_sizes(plan)                rows of every pool searched, pool files validated
    plan_indexes(cfg, sizes, dim)   the index factory each pool gets, checked against its size

A file the validator refuses, a factory that cannot index a pool, or a bad key fails here with a
ConfigError (the job exits 2), not after hours of embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel_ray.config import ConfigError, resolve_against
from umarvel_ray.data.catalogue import MBEIR_TASKS, TaskSpec
from umarvel_ray.data.mbeir import GLOBAL_POOL_FILE, read_qids
from umarvel_ray.data.model_items import TEXT_RULES
from umarvel_ray.data.tasks import discover_tasks, expected_tasks, union_test_pool
from umarvel_ray.embed.config import EmbedConfig
from umarvel_ray.eval.report import POOLS
from umarvel_ray.eval.rerank_options import RerankOptions, check_rerank_depth, check_rerank_options
from umarvel_ray.index.factory import RULE, factory_for_pool
from umarvel_ray.index.options import SearchOptions, check_search_options

log = logging.getLogger("umarvel_ray.eval")

LOCAL_SOURCES = ("auto", "global", "local")


@dataclass
class EvalConfig(SearchOptions, RerankOptions):
    """Settings of one M-BEIR evaluation (`jobs/evaluate.py --config CFG key=value ...`).

    Where the indexes live and run is `SearchOptions` (index_backend, index_device, index_shards,
    index_shard_cpus); how the inputs are embedded is the nested `embed` section, as for mining
    and teacher scoring; reranking of each query's top-K is `RerankOptions` (rerank, rerank_model,
    rerank_top_k, rerank_weight, rerank_task_weights, ..., the `rerank_pool` section).
    """

    data_root: str = field(default="", metadata={"path": "cwd", "help": "M-BEIR root (query/, cand_pool/, qrels/, images)"})
    model: str = field(default="", metadata={"path": "model", "help": "embedder model directory (merged checkpoint)"})
    adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional LoRA adapter directory"})
    out_dir: str = field(default="", metadata={"path": "cwd", "help": "embeddings, indexes, runs and the report go here"})
    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "task names (e.g. mscoco_task0, myphotos_task0); empty = every "
            "query/test/mbeir_<dataset>_task<N>_test.jsonl in data_root (data.tasks.discover_tasks)"
        },
    )
    task_k: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "R@k of tasks other than the 16 M-BEIR ones, e.g. {myphotos_task0: 10}; default 5"},
    )
    global_from_local: bool = field(
        default=True,
        metadata={
            "help": "when global_pool_file is missing, the global pool is the union of the local pools "
            "(written to out_dir/inputs/union_test_cand_pool.jsonl; conflicting ids refused)"
        },
    )
    pools: list[str] = field(default_factory=lambda: list(POOLS), metadata={"help": "local and/or global"})
    k: list[int] = field(
        default_factory=lambda: [1, 5, 10],
        metadata={"help": "hit rates reported besides each task's R@5/R@10; search depth = max"},
    )
    combine_queries: bool = field(
        default=True, metadata={"help": "embed all tasks' queries in one pipeline (qids must not collide)"}
    )
    local_source: str = field(
        default="auto",
        metadata={
            "help": "local indexes from: global (id subset of the global embeddings), local (embed each "
            "local pool file), auto (global when the global pool is embedded anyway)"
        },
    )
    global_pool_file: str = field(
        default=GLOBAL_POOL_FILE, metadata={"path": "data", "help": "union pool, relative to data_root"}
    )
    index_factory: str = field(
        default="Flat",
        metadata={
            "help": f"faiss factory string; Flat = exact. Per pool (local pools and the union): {RULE}. "
            "Checked against every pool's size before embedding starts; the factory each pool got is "
            "logged and recorded in mbeir.json"
        },
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 vector storage in the index"})
    nprobe: int | None = field(default=None, metadata={"help": "IVF nprobe (approximate factories)"})
    search_batch_size: int = field(default=1024, metadata={"help": "queries per search call"})
    reuse_embeddings: bool = field(
        default=True, metadata={"help": "reuse complete embeddings made with the same settings (embed.ensure)"}
    )
    reuse_indexes: bool = field(default=True, metadata={"help": "reuse saved, matching indexes"})
    write_runs: bool = field(default=True, metadata={"help": "write TREC run files under out_dir/runs"})
    run_id: str = field(default="umarvel", metadata={"help": "TREC run tag (no spaces)"})
    embed: EmbedConfig = field(
        default_factory=EmbedConfig,
        metadata={
            "help": "embedding settings (batch_size, use_gpu, dtype, text_rule, max_pixels, ...); the "
            "query instruction: embed.prompt_index null = one of the prompts per query, drawn with "
            "embed.instruction_seed, else that prompt for every query; "
            "input/output_dir/kind/model/adapter/data_root/overwrite are set by the job"
        },
    )


@dataclass
class TaskPlan:
    """One task that will be evaluated: its files, its query ids, and which pools it gets."""

    spec: TaskSpec
    query_file: Path
    qrels_file: Path
    pool_file: Path | None  # None: local pool file missing (local evaluation skipped)
    qids: list[str]
    pools: list[str]

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class EvalPlan:
    """Resolved evaluation: tasks to run, skipped tasks/pools with reasons, depth and paths."""

    data_root: Path
    out_dir: Path
    tasks: list[TaskPlan]
    skipped: dict[str, str]  # "task" or "task/pool" -> reason
    global_pool_file: Path | None  # None: global evaluation skipped (file missing or not asked for)
    depth: int
    expected: list[TaskSpec] = field(default_factory=lambda: list(MBEIR_TASKS))  # report columns
    global_sources: list[Path] = field(default_factory=list)  # local pools merged (no union file)

    def task(self, name: str) -> TaskPlan:
        return next(t for t in self.tasks if t.name == name)


class InputError(ConfigError):
    """Input files that fail the validator's checks; the message lists its FILE:LINE: field lines.

    A ConfigError, so the job exits 2 before any embedding, as for a bad config.
    """


def require_valid(reports: Sequence[Any], max_lines: int = 20) -> None:
    """Raise InputError with the problems of validator `FileReport`s, if any (the same lines
    `jobs/validate_data.py` prints for these files)."""
    errors = sum(r.errors for r in reports)
    if not errors:
        return
    problems = [str(p) for r in reports for p in r.problems][:max_lines]
    more = f"\n... and {errors - len(problems)} more" if errors > len(problems) else ""
    raise InputError(
        f"{errors} problem(s) in the input files (as jobs/validate_data.py reports them):\n"
        + "\n".join(problems)
        + more
    )


def check_config(cfg: EvalConfig) -> None:
    """Reject a config that cannot work before any file is read; ConfigError names the key."""
    for name in ("data_root", "model", "out_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name} is required (set {name}=...)")
    if not Path(cfg.data_root).expanduser().is_dir():
        raise ConfigError(f"data_root is not a directory: {cfg.data_root}")
    bad_pools = [p for p in cfg.pools if p not in POOLS]
    if bad_pools or not cfg.pools:
        raise ConfigError(f"pools must be a non-empty subset of {POOLS}, got {cfg.pools}")
    if not cfg.k or any(int(k) < 1 for k in cfg.k):
        raise ConfigError(f"k must be a non-empty list of positive ints, got {cfg.k}")
    if cfg.embed.prompt_index is not None and cfg.embed.prompt_index < 0:
        raise ConfigError(
            "embed.prompt_index must be null (one instruction drawn per query, seeded by "
            f"embed.instruction_seed) or a prompt index >= 0, got {cfg.embed.prompt_index!r}"
        )
    if cfg.embed.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"embed.use_gpu must be auto, true or false, got {cfg.embed.use_gpu!r}")
    if cfg.local_source not in LOCAL_SOURCES:
        raise ConfigError(f"local_source must be one of {LOCAL_SOURCES}, got {cfg.local_source!r}")
    if cfg.search_batch_size < 1:
        raise ConfigError("search_batch_size must be >= 1")
    check_search_options(cfg)
    if not cfg.run_id or any(c.isspace() for c in cfg.run_id):
        raise ConfigError(f"run_id must be a non-empty token without spaces, got {cfg.run_id!r}")
    if cfg.embed.text_rule not in TEXT_RULES:
        raise ConfigError(f"embed.text_rule must be one of {TEXT_RULES}, got {cfg.embed.text_rule!r}")
    check_rerank_options(cfg)


def instruction_settings(cfg: EvalConfig) -> dict[str, Any]:
    """How query instructions were chosen (recorded in the report's settings)."""
    e = cfg.embed
    if e.prompt_index is not None:
        return {"mode": "fixed", "prompt_index": e.prompt_index, "file": e.instructions}
    return {"mode": "random", "seed": e.instruction_seed, "file": e.instructions}


def _global_pool(
    cfg: EvalConfig, root: Path, found: Sequence[TaskSpec], skipped: dict[str, str]
) -> tuple[Path | None, list[Path]]:
    """The global pool file (None: no global evaluation) and the local pools merged into it.

    Without the union file the local pools of every task of the directory are merged (when
    `global_from_local`), not only the selected ones: the global number must not depend on `tasks=`.
    """
    if "global" not in cfg.pools:
        return None, []
    g = resolve_against(root, cfg.global_pool_file)
    if g.is_file():
        return g, []
    if cfg.global_from_local and any((root / t.pool_file).is_file() for t in found):
        out = Path(cfg.out_dir).expanduser() / "inputs" / "union_test_cand_pool.jsonl"
        global_file, sources = union_test_pool(root, found, out)
        log.warning("global pool file %s missing: using the union of %d local pools", g, len(sources))
        return global_file, sources
    skipped["global"] = f"global pool file missing: {g}"
    return None, []


def _plan_task(
    cfg: EvalConfig, spec: TaskSpec, root: Path, global_file: Path | None, skipped: dict[str, str]
) -> TaskPlan | None:
    """One task's plan, or None (reason in `skipped`) when its files or pools are missing; its
    query and qrels files are validated (InputError) before their ids are read."""
    from umarvel_ray.data.validate import validate_qrels_file, validate_query_file

    qf, rf, pf = root / spec.query_file, root / spec.qrels_file, root / spec.pool_file
    if not qf.is_file():
        skipped[spec.name] = f"query file missing: {qf}"
        return None
    if not rf.is_file():
        skipped[spec.name] = f"qrels file missing: {rf}"
        return None
    require_valid([validate_query_file(qf), validate_qrels_file(rf, spec.task_id)[0]])
    qids = read_qids(qf)
    if not qids:
        skipped[spec.name] = f"no queries in {qf}"
        return None
    pools = []
    if "local" in cfg.pools:
        if pf.is_file():
            pools.append("local")
        else:
            skipped[f"{spec.name}/local"] = f"local pool file missing: {pf}"
    if global_file is not None:
        pools.append("global")
    elif "global" in cfg.pools:
        skipped[f"{spec.name}/global"] = skipped["global"]
    if not pools:
        skipped.setdefault(spec.name, "no pool to evaluate against")
        return None
    return TaskPlan(spec, qf, rf, pf if pf.is_file() else None, qids, pools)


def plan_tasks(cfg: EvalConfig) -> EvalPlan:
    """Resolve tasks and pools against the data root; missing files skip a task or pool.

    Query and qrels files are checked with the validator's own functions: a file it refuses is
    refused here with the same FILE:LINE: field lines (InputError), before anything is embedded.
    """
    check_config(cfg)
    root = Path(cfg.data_root).expanduser().resolve()
    try:
        found = discover_tasks(root, "test", cfg.task_k)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    expected = expected_tasks(found)
    by_name = {t.name: t for t in expected}
    unknown = [t for t in cfg.tasks if t not in by_name]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {', '.join(by_name)}")
    wanted = [by_name[n] for n in cfg.tasks] if cfg.tasks else expected
    skipped: dict[str, str] = {}
    global_file, global_sources = _global_pool(cfg, root, found, skipped)
    tasks = [t for spec in wanted if (t := _plan_task(cfg, spec, root, global_file, skipped)) is not None]
    depth = max(int(k) for k in cfg.k)
    depth = max([depth, *(t.spec.k for t in tasks)])
    check_rerank_depth(cfg, depth)
    for key, why in skipped.items():
        log.warning("skipped %s: %s", key, why)
    return EvalPlan(
        root, Path(cfg.out_dir).expanduser(), tasks, skipped, global_file, depth, expected, global_sources
    )


def pool_sizes(plan: EvalPlan) -> dict[str, int]:
    """Rows of every pool the plan searches ("<task>/local", "global"), each file validated first
    (InputError with the validator's FILE:LINE lines for a file it refuses)."""
    from umarvel_ray.data.validate import validate_pool_file

    files: dict[str, Path] = {f"{t.name}/local": t.pool_file for t in plan.tasks if t.pool_file and "local" in t.pools}
    if plan.global_pool_file is not None and any("global" in t.pools for t in plan.tasks):
        files["global"] = plan.global_pool_file
    reports = {name: validate_pool_file(path)[0] for name, path in files.items()}
    require_valid(list(reports.values()))
    return {name: rep.rows for name, rep in reports.items()}


def plan_indexes(cfg: EvalConfig, sizes: Mapping[str, int], dim: int) -> dict[str, str]:
    """The factory each pool's index will get (`index.factory.RULE`), checked before embedding.

    Builds one empty index per distinct factory (dim from the model config, no weights) so that
    a bad factory string, an nprobe that does not apply, or a backend/device that cannot run it
    fails now with a ConfigError naming the pool and its size, not after hours of embedding.
    """
    from umarvel_ray.index import new_index

    train_rows = 100_000  # build_index's default sample size
    chosen: dict[str, str] = {}
    for pool, n in sizes.items():
        factory, why = factory_for_pool(cfg.index_factory, min(n, train_rows))
        chosen[pool] = factory
        if why:
            log.warning("index %s (%d candidates): %s", pool, n, why)
        else:
            log.debug("index %s (%d candidates): %s", pool, n, factory)
    for factory in sorted(set(chosen.values())):
        n_pools = sum(f == factory for f in chosen.values())
        sizes_of = [sizes[p] for p, f in chosen.items() if f == factory]
        log.info("index plan: %s for %d pool(s) of %d..%d candidates", factory, n_pools, min(sizes_of), max(sizes_of))
    for factory in sorted(set(chosen.values())):
        pools = [f"{p} ({sizes[p]} candidates)" for p, f in chosen.items() if f == factory]
        nprobe = cfg.nprobe if factory == cfg.index_factory else None
        try:
            new_index(dim, factory, cfg.fp16, cfg.index_device, cfg.index_backend, nprobe)
        except (ValueError, RuntimeError, ImportError) as exc:
            raise ConfigError(
                f"index_factory={cfg.index_factory!r} (as {factory!r}) cannot index {', '.join(pools)}: {exc}"
            ) from exc
    return chosen


__all__ = [
    "EvalConfig",
    "EvalPlan",
    "InputError",
    "TaskPlan",
    "check_config",
    "instruction_settings",
    "plan_indexes",
    "plan_tasks",
    "pool_sizes",
]
