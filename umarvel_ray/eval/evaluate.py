"""M-BEIR evaluation end to end: embed -> index -> search -> metrics -> run files and report.

    plan_tasks(cfg)                 which tasks / pools can be evaluated (missing files = skipped)
    embed_stage(cfg, plan)          query + pool embeddings under out_dir/embeddings (Ray Data)
    evaluate_stage(cfg, plan, emb)  indexes under out_dir/index, search, metrics, TREC runs, report

`run_evaluation(cfg)` chains the three. The work is organised so that nothing is embedded twice:

- Queries: the test files of all selected tasks are concatenated into one query input (tasks
  whose qids would collide go into separate inputs) and embedded by one Ray Data pipeline, so the
  model is loaded once, not 16 times. The instruction of a query depends only on (seed, qid) or
  the fixed prompt index, so the vectors are the same as embedding each file on its own.
- Pools: the global union pool is embedded once. Each task's local index is cut out of the global
  embeddings by id subset (the union contains every local pool); a task's own pool file is
  embedded only when some of its ids are not in the global pool, or when `local_source=local`.
- Restart: an embedding directory is reused when its manifest is complete and a fingerprint
  (input sha256, model files, instruction and embedding settings) recorded next to it matches;
  an index is reused when its saved meta exists and its fingerprint (source manifest, id subset,
  factory, fp16, backend) matches. Partially embedded directories resume through run_embedding.

Output layout (out_dir): config.yaml, embeddings/{queries-*,pool-global,pool-local-<task>}/,
index/global.*, index/local/<task>.*, runs/<task>.<pool>.trec, mbeir.json, mbeir.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError, check_model_dir, require_absolute, save_config
from umarvel_ray.data.mbeir import (
    GLOBAL_POOL_FILE,
    INSTRUCTIONS_FILE,
    MBEIR_TASKS,
    TEXT_RULES,
    TaskSpec,
    iter_jsonl,
    read_pool,
    read_qrels,
    read_queries,
)
from umarvel_ray.data.tasks import discover_tasks, expected_tasks, union_test_pool
from umarvel_ray.eval.metrics import RetrievalMetrics, evaluate_run, macro_average, run_from_search
from umarvel_ray.eval.report import POOLS, run_path, write_report, write_trec_run
from umarvel_ray.index.factory import RULE, factory_for_pool
from umarvel_ray.index.options import index_shards_option, shard_cpus_option
from umarvel_ray.io import atomic_write_json, dir_signature, file_sha256, read_json_or_none, write_if_changed

log = logging.getLogger("umarvel_ray.eval")

EMBED_DIR = "embeddings"
INDEX_DIR = "index"
FINGERPRINT_SUFFIX = ".eval.json"  # next to an embedding directory: what it was made from
INDEX_SOURCE_SUFFIX = ".source.json"  # next to a saved index: what it was built from
LOCAL_SOURCES = ("auto", "global", "local")


@dataclass
class EvalConfig:
    """Settings of one M-BEIR evaluation (`jobs/evaluate.py --config CFG key=value ...`)."""

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
    instruction: str = field(
        default="random", metadata={"help": "random (one of the prompts per query, seeded) | fixed"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the per-query instruction draw (random)"})
    prompt_index: int = field(default=0, metadata={"help": "prompt used for every query (fixed)"})
    batch_size: int = field(default=32, metadata={"help": "rows per model forward"})
    num_actors: int = field(default=0, metadata={"help": "embedder actors; 0 = one per GPU, or 1 on CPU"})
    actor_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per embedder actor"})
    decode_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per decode task"})
    shard_rows: int = field(
        default=10000, metadata={"help": "input lines per embedding shard (restart unit)"}
    )
    use_gpu: str = field(default="auto", metadata={"help": "embedding on GPU: auto | true | false"})
    dtype: str | None = field(default=None, metadata={"help": "model dtype override (float32|bfloat16|auto)"})
    embed_overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra EmbedConfig keys, e.g. {max_pixels: 200704}"}
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
    instructions_file: str = field(default=INSTRUCTIONS_FILE, metadata={"path": "data", "help": "relative to data_root"})
    index_factory: str = field(
        default="Flat",
        metadata={
            "help": f"faiss factory string; Flat = exact. Per pool (local pools and the union): {RULE}. "
            "Checked against every pool's size before embedding starts; the factory each pool got is "
            "logged and recorded in mbeir.json"
        },
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 vector storage in the index"})
    backend: str = field(default="auto", metadata={"help": "index backend: auto | faiss | torch"})
    device: str = field(default="auto", metadata={"help": "index device: auto | cpu | cuda"})
    nprobe: int | None = field(default=None, metadata={"help": "IVF nprobe (approximate factories)"})
    index_shards: int = index_shards_option()
    index_shard_cpus: float = shard_cpus_option()
    search_batch_size: int = field(default=1024, metadata={"help": "queries per search call"})
    text_rule: str = field(
        default="uniir",
        metadata={
            "help": "query and candidate text: uniir (UniIR's format_string, as the published numbers) | "
            "none (texts as they are in the files)"
        },
    )
    reuse_embeddings: bool = field(default=True, metadata={"help": "reuse complete, matching embeddings"})
    reuse_indexes: bool = field(default=True, metadata={"help": "reuse saved, matching indexes"})
    write_runs: bool = field(default=True, metadata={"help": "write TREC run files under out_dir/runs"})
    run_id: str = field(default="umarvel", metadata={"help": "TREC run tag (no spaces)"})
    ray_address: str | None = field(
        default=None, metadata={"help": "Ray address; null = RAY_ADDRESS or local"}
    )


# ---------------------------------------------------------------------------------------------
# Plan: which tasks and pools can run
# ---------------------------------------------------------------------------------------------


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


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


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


def read_qids(path: Path) -> list[str]:
    """Query ids of a query jsonl in file order; a bad record raises MBEIRFormatError (FILE:LINE)."""
    return read_queries(path, validate=True).column("qid").to_pylist()


def read_dids(path: Path) -> list[str]:
    """Candidate ids of a pool jsonl in file order; a bad record raises MBEIRFormatError (FILE:LINE)."""
    return read_pool(path, validate=True).column("did").to_pylist()


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
    if cfg.instruction not in ("random", "fixed"):
        raise ConfigError(f"instruction must be random or fixed, got {cfg.instruction!r}")
    if str(cfg.use_gpu).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"use_gpu must be auto, true or false, got {cfg.use_gpu!r}")
    if cfg.local_source not in LOCAL_SOURCES:
        raise ConfigError(f"local_source must be one of {LOCAL_SOURCES}, got {cfg.local_source!r}")
    if cfg.search_batch_size < 1:
        raise ConfigError("search_batch_size must be >= 1")
    if cfg.index_shards < 0 or cfg.index_shard_cpus <= 0:
        raise ConfigError("index_shards must be >= 0 and index_shard_cpus > 0")
    if not cfg.run_id or any(c.isspace() for c in cfg.run_id):
        raise ConfigError(f"run_id must be a non-empty token without spaces, got {cfg.run_id!r}")
    if cfg.text_rule not in TEXT_RULES:
        raise ConfigError(f"text_rule must be one of {TEXT_RULES}, got {cfg.text_rule!r}")


def plan_tasks(cfg: EvalConfig) -> EvalPlan:
    """Resolve tasks and pools against the data root; missing files skip a task or pool.

    Query and qrels files are checked with the validator's own functions: a file it refuses is
    refused here with the same FILE:LINE: field lines (InputError), before anything is embedded.
    """
    from umarvel_ray.data.validate import validate_qrels_file, validate_query_file

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
    global_file: Path | None = None
    global_sources: list[Path] = []
    if "global" in cfg.pools:
        g = _resolve(root, cfg.global_pool_file)
        if g.is_file():
            global_file = g
        elif cfg.global_from_local and any((root / t.pool_file).is_file() for t in found):
            # Over every task of the directory, not only the selected ones: the global number must
            # not depend on `tasks=`.
            out = Path(cfg.out_dir).expanduser() / "inputs" / "union_test_cand_pool.jsonl"
            global_file, global_sources = union_test_pool(root, found, out)
            log.warning("global pool file %s missing: using the union of %d local pools", g, len(global_sources))
        else:
            skipped["global"] = f"global pool file missing: {g}"
    tasks: list[TaskPlan] = []
    for spec in wanted:
        qf, rf, pf = root / spec.query_file, root / spec.qrels_file, root / spec.pool_file
        if not qf.is_file():
            skipped[spec.name] = f"query file missing: {qf}"
            continue
        if not rf.is_file():
            skipped[spec.name] = f"qrels file missing: {rf}"
            continue
        require_valid([validate_query_file(qf), validate_qrels_file(rf, spec.task_id)[0]])
        qids = read_qids(qf)
        if not qids:
            skipped[spec.name] = f"no queries in {qf}"
            continue
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
            continue
        tasks.append(TaskPlan(spec, qf, rf, pf if pf.is_file() else None, qids, pools))
    depth = max(int(k) for k in cfg.k)
    depth = max([depth, *(t.spec.k for t in tasks)])
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
            new_index(dim, factory, cfg.fp16, cfg.device, cfg.backend, nprobe)
        except (ValueError, RuntimeError, ImportError) as exc:
            raise ConfigError(
                f"index_factory={cfg.index_factory!r} (as {factory!r}) cannot index {', '.join(pools)}: {exc}"
            ) from exc
    return chosen


# ---------------------------------------------------------------------------------------------
# Fingerprints (what an embedding directory / index was made from)
# ---------------------------------------------------------------------------------------------


def manifest_digest(emb_dir: Path) -> str | None:
    """sha256 of a complete embedding directory's manifest.json, None while incomplete."""
    from umarvel_ray.store import MANIFEST_NAME

    p = emb_dir / MANIFEST_NAME
    data = read_json_or_none(p)
    if not isinstance(data, dict) or data.get("complete") is False:
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def instruction_settings(cfg: EvalConfig) -> dict[str, Any]:
    """How query instructions were chosen (recorded in fingerprints and in the report)."""
    if cfg.instruction == "fixed":
        return {"mode": "fixed", "prompt_index": cfg.prompt_index, "file": cfg.instructions_file}
    return {"mode": "random", "seed": cfg.seed, "file": cfg.instructions_file}


# ---------------------------------------------------------------------------------------------
# Embedding stage
# ---------------------------------------------------------------------------------------------


@dataclass
class EmbeddingSet:
    """Embedding directories an evaluation reads: query dirs (any grouping of tasks), pools."""

    queries: list[Path]
    global_pool: Path | None = None
    local_pools: dict[str, Path] = field(default_factory=dict)
    embedded: list[str] = field(default_factory=list)  # names embedded (fully or resumed) this run
    reused: list[str] = field(default_factory=list)  # names reused without any embedding work


def group_query_tasks(tasks: Sequence[TaskPlan], combine: bool = True) -> list[list[TaskPlan]]:
    """Tasks grouped for one query embedding each: greedy, a task joins the first group whose qids
    it does not collide with (an embedding directory holds each id once)."""
    if not combine:
        return [[t] for t in tasks]
    groups: list[list[TaskPlan]] = []
    seen: list[set[str]] = []
    for t in tasks:
        q = set(t.qids)
        for g, s in zip(groups, seen, strict=True):
            if s.isdisjoint(q):
                g.append(t)
                s |= q
                break
        else:
            groups.append([t])
            seen.append(q)
    return groups


def _group_name(group: Sequence[TaskPlan]) -> str:
    if len(group) == 1:
        return f"queries-{group[0].name}"
    digest = hashlib.sha1(",".join(t.name for t in group).encode()).hexdigest()[:10]
    return f"queries-{len(group)}tasks-{digest}"


def write_combined_queries(path: Path, files: Sequence[Path]) -> Path:
    """Concatenate query files into `path` (rewritten only when the content changes)."""
    parts = []
    for f in files:
        b = f.read_bytes()
        parts.append(b if not b or b.endswith(b"\n") else b + b"\n")
    write_if_changed(path, b"".join(parts))
    return path


def tasks_needing_local_embedding(tasks: Iterable[TaskPlan], global_ids: Iterable[str]) -> list[str]:
    """Tasks (with a local pool) whose pool has an id that is not in the global embeddings."""
    have = set(global_ids)
    out = []
    for t in tasks:
        if "local" in t.pools and t.pool_file is not None and not have.issuperset(read_dids(t.pool_file)):
            out.append(t.name)
    return out


def pool_ids_seen(emb_dir: Path) -> set[str]:
    """Ids an embedding run saw: embedded rows plus rows it rejected (rejects.jsonl).

    A local pool row rejected in the global run (say, an unreadable image) would be rejected again
    if its pool file were embedded on its own, so it must not trigger a local re-embedding.
    """
    from umarvel_ray.store import read_embeddings

    seen = set(read_embeddings(emb_dir, columns=("id",)).ids.tolist())
    rejects = emb_dir / "rejects.jsonl"
    if rejects.is_file():
        for _, obj, err in iter_jsonl(rejects):
            if err is None and isinstance(obj, dict) and isinstance(obj.get("id"), str):
                seen.add(obj["id"])
    return seen


def embedding_rejects(emb: EmbeddingSet) -> list[str]:
    """Every row the embedding runs of this evaluation rejected, as FILE:LINE: field 'F': reason.

    A rejected query still counts in its task (as a miss) and a rejected candidate is simply not
    in the index; this list is how the job's summary accounts for each of them.
    """
    from umarvel_ray.data.jsonl import read_records
    from umarvel_ray.data.mbeir import format_issue

    dirs = [*emb.queries, *([emb.global_pool] if emb.global_pool else []), *emb.local_pools.values()]
    out = []
    for d in dirs:
        p = d / "rejects.jsonl"
        if p.is_file():
            out += [format_issue(r["file"], r["line"], r["field"], r["reason"]) for r in read_records(p)]
    return out


def _embed_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "data_root": str(Path(cfg.data_root).expanduser().resolve()),
        "model": cfg.model,
        "adapter": cfg.adapter,
        "instructions": cfg.instructions_file,
        "batch_size": cfg.batch_size,
        "num_actors": cfg.num_actors,
        "actor_num_cpus": cfg.actor_num_cpus,
        "decode_num_cpus": cfg.decode_num_cpus,
        "shard_rows": cfg.shard_rows,
        "use_gpu": str(cfg.use_gpu).lower(),  # `use_gpu=false` on the CLI arrives as "False"
        "dtype": cfg.dtype,
        "ray_address": cfg.ray_address,
        "text_rule": cfg.text_rule,
    }
    kw.update(cfg.embed_overrides)
    return kw


def ensure_embedded(cfg: EvalConfig, name: str, input_path: Path, kind: str, emb: EmbeddingSet) -> Path:
    """Embed `input_path` into out_dir/embeddings/<name> unless a matching complete one exists."""
    from umarvel_ray.embed.config import EmbedConfig
    from umarvel_ray.embed.run import run_embedding

    base = Path(cfg.out_dir).expanduser() / EMBED_DIR
    out = base / name
    fp_path = base / f"{name}{FINGERPRINT_SUFFIX}"
    kw = _embed_kwargs(cfg)
    fingerprint = {
        "kind": kind,
        "input": str(input_path),
        "input_sha256": file_sha256(input_path),
        "model": str(Path(cfg.model).expanduser().resolve()),
        "model_signature": dir_signature(Path(cfg.model).expanduser()),
        "adapter": cfg.adapter,
        "adapter_signature": dir_signature(Path(cfg.adapter).expanduser()) if cfg.adapter else None,
        "instruction": instruction_settings(cfg) if kind == "query" else None,
        "text_rule": kw["text_rule"],
        "dtype": cfg.dtype,
        "shard_rows": cfg.shard_rows,
        "embed_overrides": cfg.embed_overrides,
    }
    old = read_json_or_none(fp_path) if fp_path.is_file() else None
    digest = manifest_digest(out)
    if (
        cfg.reuse_embeddings
        and isinstance(old, dict)
        and old.get("fingerprint") == fingerprint
        and digest is not None
        and old.get("manifest_sha256") == digest
    ):
        log.info("reusing embeddings %s", out)
        emb.reused.append(name)
        return out
    if not cfg.reuse_embeddings or (isinstance(old, dict) and old.get("fingerprint") != fingerprint):
        shutil.rmtree(out, ignore_errors=True)  # ours: made with other settings, or reuse disabled
    fp_path.unlink(missing_ok=True)
    ecfg = EmbedConfig(
        **{
            **kw,
            "input": str(input_path),
            "kind": kind,
            "output_dir": str(out),
            "prompt_index": cfg.prompt_index if cfg.instruction == "fixed" else None,
            "instruction_seed": cfg.seed,
            "overwrite": True,
        }
    )
    result = run_embedding(ecfg)
    log.info("embedded %s: %s", name, getattr(result, "summary", ""))
    digest = manifest_digest(out)
    if digest is None:
        raise RuntimeError(f"embedding of {input_path} finished without a complete manifest in {out}")
    atomic_write_json(fp_path, {"fingerprint": fingerprint, "manifest_sha256": digest})
    emb.embedded.append(name)
    return out


def embed_stage(cfg: EvalConfig, plan: EvalPlan) -> EmbeddingSet:
    """Embed queries (grouped), the global pool once, and local pools only where needed."""
    emb = EmbeddingSet(queries=[])
    base = plan.out_dir / EMBED_DIR
    for group in group_query_tasks(plan.tasks, cfg.combine_queries):
        name = _group_name(group)
        if len(group) == 1:
            src = group[0].query_file
        else:
            src = write_combined_queries(base / "inputs" / f"{name}.jsonl", [t.query_file for t in group])
        emb.queries.append(ensure_embedded(cfg, name, src, "query", emb))
    local_tasks = [t for t in plan.tasks if "local" in t.pools]
    use_global = plan.global_pool_file is not None and (
        cfg.local_source == "global"
        or (cfg.local_source == "auto" and any("global" in t.pools for t in plan.tasks))
    )
    if plan.global_pool_file is None and cfg.local_source == "global" and local_tasks:
        g = _resolve(plan.data_root, cfg.global_pool_file)
        if g.is_file():  # global evaluation not asked for, but the local indexes come from it
            plan.global_pool_file, use_global = g, True
    if plan.global_pool_file is not None and (use_global or any("global" in t.pools for t in plan.tasks)):
        emb.global_pool = ensure_embedded(cfg, "pool-global", plan.global_pool_file, "candidate", emb)
    need_local = [t.name for t in local_tasks]
    if use_global and emb.global_pool is not None and cfg.local_source != "local":
        need_local = tasks_needing_local_embedding(local_tasks, pool_ids_seen(emb.global_pool))
        for n in need_local:
            log.warning("%s: local pool has ids missing from the global embeddings: embedding it", n)
    for n in need_local:
        t = plan.task(n)
        assert t.pool_file is not None
        emb.local_pools[n] = ensure_embedded(cfg, f"pool-local-{n}", t.pool_file, "candidate", emb)
    return emb


# ---------------------------------------------------------------------------------------------
# Index stage
# ---------------------------------------------------------------------------------------------


class PoolEmbeddings:
    """Random access by id into an embedding directory (ids in memory, vectors read per shard)."""

    def __init__(self, directory: Path):
        import pyarrow.parquet as pq

        from umarvel_ray.store import list_shards

        self.directory = directory
        self.shards = list_shards(directory)
        ids, sizes = [], []
        for p in self.shards:
            col = pq.read_table(p, columns=["id"]).column("id").to_numpy(zero_copy_only=False)
            ids.append(np.asarray(col, dtype=object))
            sizes.append(len(col))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, object)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._sorted_ids = self.ids.astype(str)
        self._order = np.argsort(self._sorted_ids, kind="stable")
        self._sorted_ids = self._sorted_ids[self._order]

    def positions(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of `ids` and a mask of which were found."""
        q = np.asarray(list(ids), dtype=str)
        if not len(self._sorted_ids) or not len(q):
            return np.zeros(len(q), np.int64), np.zeros(len(q), bool)
        at = np.clip(np.searchsorted(self._sorted_ids, q), 0, len(self._sorted_ids) - 1)
        found = self._sorted_ids[at] == q
        return self._order[at].astype(np.int64), found

    def subset(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the requested ids present here, in request order; reads only the
        shards holding them."""
        import pyarrow.parquet as pq

        from umarvel_ray.store import vectors_from_arrow

        pos, found = self.positions(ids)
        pos = pos[found]
        req = np.asarray(list(ids), dtype=object)[found]
        shard_of = np.searchsorted(self.offsets, pos, side="right") - 1
        vectors: np.ndarray | None = None
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            vec = vectors_from_arrow(pq.read_table(self.shards[s], columns=["vector"]).column("vector"))
            if vectors is None:
                vectors = np.empty((len(pos), vec.shape[1]), np.float32)
            vectors[rows] = vec[pos[rows] - self.offsets[s]]
        if vectors is None:
            vectors = np.zeros((0, 1), np.float32)
        return req, vectors


def _index_fingerprint(cfg: EvalConfig, source: Path, subset: Sequence[str] | None) -> dict[str, Any]:
    sub = None
    if subset is not None:
        sub = hashlib.sha256("\n".join(sorted(subset)).encode()).hexdigest()
    return {
        "source": str(source),
        "source_manifest_sha256": manifest_digest(source),
        "subset_sha256": sub,
        "factory": cfg.index_factory,
        "fp16": cfg.fp16,
        "backend": cfg.backend,
        "nprobe": cfg.nprobe,
    }


def _load_backend(cfg: EvalConfig) -> str | None:
    return None if cfg.backend == "auto" else cfg.backend


def ensure_index(
    cfg: EvalConfig,
    path: Path,
    source: Path,
    subset: Sequence[str] | None = None,
    store: PoolEmbeddings | None = None,
    built: list[str] | None = None,
    reused: list[str] | None = None,
    service: Any = None,
) -> Any:
    """Load the index saved at `path` if it was built from the same source, else build and save it.

    `subset`: only these ids of `source` (a local pool cut out of the global embeddings).
    `service`: an `index.service.SearchService` whose shard actors build (or load) the index from
    disk instead of this process; it is returned in place of an in-process index.
    """
    from umarvel_ray.index import build_index, build_index_from_embeddings, load_index, read_index_meta
    from umarvel_ray.index.service import IdSubset

    fingerprint = _index_fingerprint(cfg, source, subset)
    side = path.with_name(path.name + INDEX_SOURCE_SUFFIX)
    if cfg.reuse_indexes and read_json_or_none(side) == fingerprint:
        try:
            read_index_meta(path)
            if service is not None:
                index = service.load(path, backend=_load_backend(cfg))
            else:
                index = load_index(path, device=cfg.device, backend=_load_backend(cfg))
            if cfg.nprobe is not None and hasattr(index, "set_search_params"):
                index.set_search_params(nprobe=cfg.nprobe)
            log.info("reusing index %s (%d vectors)", path, len(index))
            if reused is not None:
                reused.append(str(path))
            return index
        except (FileNotFoundError, ValueError, OSError) as exc:
            log.warning("rebuilding index %s: %s", path, exc)
    side.unlink(missing_ok=True)
    opts = dict(
        factory=cfg.index_factory, fp16=cfg.fp16, device=cfg.device, backend=cfg.backend, nprobe=cfg.nprobe
    )
    if service is not None:
        opts.pop("device")  # the service's own
        keep = None if subset is None else IdSubset(subset)
        index = service.build_from_embeddings(source, row_filter=keep, **opts)
    elif subset is None:
        index = build_index_from_embeddings(source, **opts)
    else:
        store = store or PoolEmbeddings(source)
        ids, vectors = store.subset(subset)
        index = build_index(vectors, ids, **opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    atomic_write_json(side, fingerprint)
    if built is not None:
        built.append(str(path))
    return index


# ---------------------------------------------------------------------------------------------
# Search + metrics stage
# ---------------------------------------------------------------------------------------------


def load_query_vectors(
    dirs: Sequence[Path], tasks: Sequence[TaskPlan]
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per task: (qids that were embedded, in file order; their vectors)."""
    from umarvel_ray.store import read_embeddings

    by_id: dict[str, np.ndarray] = {}
    dim = 0
    for d in dirs:
        e = read_embeddings(d, columns=("id", "vector"))
        assert e.vectors is not None
        dim = e.vectors.shape[1]
        for i, qid in enumerate(e.ids.tolist()):
            by_id[qid] = e.vectors[i]
    out = {}
    for t in tasks:
        qids = [q for q in t.qids if q in by_id]
        vecs = np.stack([by_id[q] for q in qids]) if qids else np.zeros((0, max(dim, 1)), np.float32)
        out[t.name] = (qids, vecs)
    return out


def _search_and_score(
    cfg: EvalConfig,
    plan: EvalPlan,
    t: TaskPlan,
    pool: str,
    index: Any,
    qids: list[str],
    qvecs: np.ndarray,
    qrels: Mapping[str, set[str]],
    pool_ids: set[str],
) -> tuple[RetrievalMetrics, dict[str, Any]]:
    t0 = time.perf_counter()
    if qids:
        scores, ids = index.search_arrays(qvecs, plan.depth, batch_size=cfg.search_batch_size)
    else:
        scores, ids = np.zeros((0, plan.depth), np.float32), np.zeros((0, plan.depth), object)
    run = run_from_search(qids, scores, ids)
    metrics = evaluate_run(run, qrels, t.spec.k, pool_ids=pool_ids, queries=t.qids, extra_ks=cfg.k)
    info: dict[str, Any] = {
        "pool_size": len(index),
        "index_factory": getattr(index, "factory", ""),
        "search_seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.write_runs:
        p = run_path(plan.out_dir, t.name, pool)
        info["run_lines"] = write_trec_run(p, run, f"{cfg.run_id}-{pool}")
        info["run_file"] = str(p)
    log.debug(  # the job prints the whole table (mbeir.md) at the end
        "%s %s: R@%d=%.4f over %d queries (pool %d)",
        t.name,
        pool,
        t.spec.k,
        metrics.hit,
        metrics.n_queries,
        len(index),
    )
    return metrics, info


def evaluate_stage(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet) -> dict[str, Any]:
    """Indexes (built or reused), search, metrics, run files, report; returns the report dict.

    With `index_shards` > 0 one search service (its shard actors) serves every pool in turn and is
    closed before this returns."""
    from umarvel_ray.index.service import SearchService

    if cfg.index_shards <= 0:
        return _evaluate_pools(cfg, plan, emb, None)
    with SearchService(cfg.index_shards, cfg.index_shard_cpus, device=cfg.device) as service:
        return _evaluate_pools(cfg, plan, emb, service)


def _evaluate_pools(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet, service: Any) -> dict[str, Any]:
    from umarvel_ray.progress import summary

    t0 = time.perf_counter()
    idx_dir = plan.out_dir / INDEX_DIR
    built: list[str] = []
    reused: list[str] = []
    queries = load_query_vectors(emb.queries, plan.tasks)
    results: dict[str, dict[str, RetrievalMetrics]] = {}
    task_settings: dict[str, dict[str, Any]] = {}
    skipped = dict(plan.skipped)
    store = PoolEmbeddings(emb.global_pool) if emb.global_pool is not None else None
    for t in plan.tasks:
        qids, qvecs = queries[t.name]
        task_settings[t.name] = {
            "query_file": str(t.query_file),
            "n_queries_file": len(t.qids),
            "n_queries_embedded": len(qids),
            "depth": plan.depth,
        }
        results[t.name] = {}
    qrels_by_task = {t.name: read_qrels(t.qrels_file) for t in plan.tasks}
    # Local pools: one index at a time (built, searched, dropped) to bound memory.
    for t in plan.tasks:
        if "local" not in t.pools:
            continue
        assert t.pool_file is not None
        wanted = read_dids(t.pool_file)
        if t.name in emb.local_pools:
            src, subset, how = emb.local_pools[t.name], None, "local-embedding"
        elif store is not None:
            src, subset, how = store.directory, wanted, "global-subset"
        else:
            skipped[f"{t.name}/local"] = "no embeddings for the local pool"
            continue
        index = ensure_index(cfg, idx_dir / "local" / t.name, src, subset, store, built, reused, service)
        qids, qvecs = queries[t.name]
        m, info = _search_and_score(
            cfg, plan, t, "local", index, qids, qvecs, qrels_by_task[t.name], set(index.ids.tolist())
        )
        results[t.name]["local"] = m
        missing = len(set(wanted)) - len(index)
        if missing:  # rejected at embedding time, or absent from the global embeddings
            log.warning(
                "%s local: %d pool ids have no embedding (their queries may be unreachable)", t.name, missing
            )
        task_settings[t.name]["local"] = {
            "source": how,
            "pool_file": str(t.pool_file),
            "pool_file_rows": len(wanted),
            "pool_ids_without_embedding": missing,
            **info,
        }
        del index
    global_tasks = [t for t in plan.tasks if "global" in t.pools]
    if global_tasks and emb.global_pool is not None:
        index = ensure_index(cfg, idx_dir / "global", emb.global_pool, None, None, built, reused, service)
        gids = set(index.ids.tolist())
        for t in global_tasks:
            qids, qvecs = queries[t.name]
            m, info = _search_and_score(
                cfg, plan, t, "global", index, qids, qvecs, qrels_by_task[t.name], gids
            )
            results[t.name]["global"] = m
            task_settings[t.name]["global"] = {"pool_file": str(plan.global_pool_file), **info}
        del index
    elif global_tasks:
        for t in global_tasks:
            skipped[f"{t.name}/global"] = "no global pool embeddings"
    results = {k: v for k, v in results.items() if v}
    settings = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "data_root": str(plan.data_root),
        "instruction": instruction_settings(cfg),
        "k": list(cfg.k),
        "depth": plan.depth,
        "pools": list(cfg.pools),
        "index_factory": cfg.index_factory,
        "fp16": cfg.fp16,
        "backend": cfg.backend,
        "local_source": cfg.local_source,
        "global_pool": str(plan.global_pool_file) if plan.global_pool_file else None,
        "global_pool_from_local_pools": [str(p) for p in plan.global_sources],
        "skipped": skipped,
    }
    paths = write_report(
        plan.out_dir, results, settings=settings, task_settings=task_settings, tasks=plan.expected
    )
    from umarvel_ray.eval.report import report_dict

    report = report_dict(results, plan.expected, settings=settings, task_settings=task_settings)
    avg = {p: macro_average(r[p].hit for r in results.values() if p in r) for p in POOLS}
    rejected = embedding_rejects(emb)
    for r in rejected[:20]:
        log.warning("rejected at embedding: %s", r)
    line = summary(
        "evaluate",
        tasks=len(results),
        rows_rejected=len(rejected),
        local_avg="-" if avg["local"] is None else f"{100 * avg['local']:.2f}",
        global_avg="-" if avg["global"] is None else f"{100 * avg['global']:.2f}",
        local_tasks=report["averages"]["local"]["n_tasks"],
        global_tasks=report["averages"]["global"]["n_tasks"],
        skipped=len(skipped),
        embedded=len(emb.embedded),
        reused_embeddings=len(emb.reused),
        indexes_built=len(built),
        indexes_reused=len(reused),
        seconds=f"{time.perf_counter() - t0:.1f}",
        report=str(paths["markdown"]),
    )
    report.update(
        {
            "summary": line,
            "skipped": skipped,
            "rejected": rejected,
            "paths": {k: str(v) for k, v in paths.items()},
            "embedded": list(emb.embedded),
            "reused_embeddings": list(emb.reused),
            "indexes_built": built,
            "indexes_reused": reused,
            "results": results,
        }
    )
    return report


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Embed -> index -> search -> metrics on an M-BEIR directory (real or toy); restartable.

    Before any embedding: every input file is validated (InputError with FILE:LINE lines) and
    the index factory is checked against every pool's size (`plan_indexes`).

    Returns the report dict (`tasks`, `averages`, `settings`, as in mbeir.json) plus `summary`
    (the SUMMARY line), `skipped`, `paths`, what was embedded / reused / built, and `results`
    ({task: {pool: RetrievalMetrics}}).
    """
    require_absolute(cfg)
    check_model_dir(cfg.model, "model")
    t0 = time.perf_counter()
    plan = plan_tasks(cfg)  # query and qrels files validated here
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, plan.out_dir)
    if not plan.tasks:
        raise ConfigError(f"nothing to evaluate in {plan.data_root}: {plan.skipped}")
    from umarvel_ray.embed.config import model_dim

    plan_indexes(cfg, pool_sizes(plan), model_dim(Path(cfg.model).expanduser()))
    emb = embed_stage(cfg, plan)
    report = evaluate_stage(cfg, plan, emb)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


__all__ = [
    "EmbeddingSet",
    "EvalConfig",
    "EvalPlan",
    "PoolEmbeddings",
    "TaskPlan",
    "embed_stage",
    "ensure_embedded",
    "ensure_index",
    "evaluate_stage",
    "group_query_tasks",
    "plan_tasks",
    "pool_ids_seen",
    "run_evaluation",
    "tasks_needing_local_embedding",
]
