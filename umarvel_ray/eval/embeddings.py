"""The evaluation's embeddings, each input embedded once (out_dir/embeddings/<name>/).

- Queries: the test files of all selected tasks are concatenated into one query input (tasks
  whose qids would collide go into separate inputs) and embedded by one Ray Data pipeline, so the
  model is loaded once, not 16 times. The instruction of a query depends only on (seed, qid) or
  the fixed prompt index, so the vectors are the same as embedding each file on its own.
- Pools: the global union pool is embedded once. Each task's local index is cut out of the global
  embeddings by id subset (the union contains every local pool); a task's own pool file is
  embedded only when some of its ids are not in the global pool, or when `local_source=local`.
- Restart: `embed.ensure.ensure_embeddings` reuses a directory whose manifest is complete and was
  made with the same settings (input bytes, model files, instruction and embedding settings);
  a partially embedded directory resumes through run_embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from umarvel_ray.config import resolve_against
from umarvel_ray.data.mbeir import iter_jsonl, read_dids
from umarvel_ray.embed.commit import REJECTS_NAME
from umarvel_ray.eval.plan import EvalConfig, EvalPlan, TaskPlan
from umarvel_ray.io import write_if_changed

log = logging.getLogger("umarvel_ray.eval")

EMBED_DIR = "embeddings"


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
    rejects = emb_dir / REJECTS_NAME
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
        p = d / REJECTS_NAME
        if p.is_file():
            out += [format_issue(r["file"], r["line"], r["field"], r["reason"]) for r in read_records(p)]
    return out


def embed_input(cfg: EvalConfig, name: str, input_path: Path, kind: str, emb: EmbeddingSet) -> Path:
    """Embed `input_path` into out_dir/embeddings/<name> unless a complete one made with the same
    settings exists (`embed.ensure`); records the name in `emb.embedded` or `emb.reused`.

    The directories are the evaluation's own, so one made with other settings is replaced
    (overwrite), and `reuse_embeddings=false` embeds everything anew.
    """
    from umarvel_ray.embed.ensure import ensure_embeddings

    out = Path(cfg.out_dir).expanduser() / EMBED_DIR / name
    _, result = ensure_embeddings(
        dataclasses.replace(cfg.embed, overwrite=True),
        kind=kind,
        input_path=input_path,
        data_root=Path(cfg.data_root).expanduser().resolve(),
        model=cfg.model,
        adapter=cfg.adapter,
        output_dir=out,
        reuse=cfg.reuse_embeddings,
    )
    if result is None:
        emb.reused.append(name)
    else:
        log.info("embedded %s: %s", name, result.summary)
        emb.embedded.append(name)
    return out


def _embed_queries(cfg: EvalConfig, plan: EvalPlan, emb: EmbeddingSet) -> None:
    """One query embedding per group of tasks whose qids do not collide."""
    base = plan.out_dir / EMBED_DIR
    for group in group_query_tasks(plan.tasks, cfg.combine_queries):
        name = _group_name(group)
        if len(group) == 1:
            src = group[0].query_file
        else:
            src = write_combined_queries(base / "inputs" / f"{name}.jsonl", [t.query_file for t in group])
        emb.queries.append(embed_input(cfg, name, src, "query", emb))


def _local_from_global(cfg: EvalConfig, plan: EvalPlan, local_tasks: Sequence[TaskPlan]) -> bool:
    """Whether the local indexes are cut out of the global embeddings (`local_source`); with
    `local_source=global` the global pool file is embedded for them even when global evaluation
    was not asked for (then `plan.global_pool_file` is set here)."""
    use_global = plan.global_pool_file is not None and (
        cfg.local_source == "global"
        or (cfg.local_source == "auto" and any("global" in t.pools for t in plan.tasks))
    )
    if plan.global_pool_file is None and cfg.local_source == "global" and local_tasks:
        g = resolve_against(plan.data_root, cfg.global_pool_file)
        if g.is_file():  # global evaluation not asked for, but the local indexes come from it
            plan.global_pool_file, use_global = g, True
    return use_global


def embed_stage(cfg: EvalConfig, plan: EvalPlan) -> EmbeddingSet:
    """Embed queries (grouped), the global pool once, and local pools only where needed."""
    emb = EmbeddingSet(queries=[])
    _embed_queries(cfg, plan, emb)
    local_tasks = [t for t in plan.tasks if "local" in t.pools]
    use_global = _local_from_global(cfg, plan, local_tasks)
    if plan.global_pool_file is not None and (use_global or any("global" in t.pools for t in plan.tasks)):
        emb.global_pool = embed_input(cfg, "pool-global", plan.global_pool_file, "candidate", emb)
    need_local = [t.name for t in local_tasks]
    if use_global and emb.global_pool is not None and cfg.local_source != "local":
        need_local = tasks_needing_local_embedding(local_tasks, pool_ids_seen(emb.global_pool))
        for n in need_local:
            log.warning("%s: local pool has ids missing from the global embeddings: embedding it", n)
    for n in need_local:
        t = plan.task(n)
        assert t.pool_file is not None
        emb.local_pools[n] = embed_input(cfg, f"pool-local-{n}", t.pool_file, "candidate", emb)
    return emb


__all__ = [
    "EMBED_DIR",
    "EmbeddingSet",
    "embed_input",
    "embed_stage",
    "embedding_rejects",
    "group_query_tasks",
    "pool_ids_seen",
    "tasks_needing_local_embedding",
    "write_combined_queries",
]
