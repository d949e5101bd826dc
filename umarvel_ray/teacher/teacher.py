"""Distillation teacher scores for stage 5 (RECIPE.md section 3, "Distillation teacher").

1. Stratified sample: per M-BEIR training task (dataset x task_id, e.g. "mscoco_task0"), a seeded
   `fraction` (10%) of its training queries, at least `min_per_task`, at most `max_per_task`.
2. Embed the sampled queries and the union training pool with the (stage-4) embedder through the
   Ray Data embedding pipeline (restartable; reused when complete).
3. Per task, exact top-`top_k` (50) over that task's LOCAL training pool. M-BEIR ships no local
   train pool files, so the local pool is the union train pool restricted to candidates whose did
   dataset id equals the task's dataset id and whose modality equals the task's candidate modality.
4. P(Yes) of the re-ranker for every (query, candidate) pair: a Ray Data pipeline of CPU decode
   tasks (query/candidate lines read by byte offset, images decoded under the re-ranker's pixel
   budget) feeding an actor pool of `RerankActor`s (one `Reranker.load` per actor, a GPU each when
   the cluster has GPUs).
5. teacher score = cos + w * P(Yes), w per task (`task_weights`, default `default_weight`);
   without a re-ranker (`reranker=null`) the teacher is cos alone, and the summary says so.

Outputs in `output_dir`: `teacher.jsonl` (one line per query, sorted by qid:
`{"qid", "task", "weight", "candidates", "cos", "p_yes", "scores"}`; `p_yes` is null without a
re-ranker), `summary.json`, `config.yaml`.

Restart: re-ranker results are committed per shard of `shard_queries` consecutive (qid-sorted)
queries to `_shards/teacher-NNNNN.json`, each stamped with a key over the re-ranker identity,
input settings and the shard's exact (qid, candidates) lists. A rerun repeats the (cheap,
deterministic) retrieval, recomputes the keys and re-scores only shards whose file is missing or
whose key differs; the final file is then assembled from the shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError, require_absolute, save_config
from umarvel_ray.data import mbeir
from umarvel_ray.data.artefacts import write_teacher
from umarvel_ray.data.queries import QueryMeta, qid_sort_key, read_query_meta
from umarvel_ray.data.tasks import job_train_inputs
from umarvel_ray.embed import decode
from umarvel_ray.embed.config import EmbedConfig, model_signature
from umarvel_ray.index.options import index_shards_option, shard_cpus_option
from umarvel_ray.io import atomic_write_json
from umarvel_ray.mine.mine import ensure_embeddings, resolve, subset_input

log = logging.getLogger("umarvel_ray.teacher")

SUMMARY_NAME = "summary.json"
SHARDS_DIR = "_shards"
DEFAULT_TASK_WEIGHTS = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}


@dataclass
class TeacherConfig:
    """Settings of one teacher-scoring job (`jobs/teacher_scores.py --config CFG key=value ...`)."""

    data_root: str = field(default="", metadata={"path": "cwd", "help": "M-BEIR root (files and images resolve against it)"})
    model: str = field(
        default="",
        metadata={"path": "model", "help": "embedder (stage-4) model dir; may be empty when both embedding dirs are complete"},
    )
    adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional embedder LoRA adapter"})
    reranker: str | None = field(
        default=None, metadata={"path": "model", "help": "re-ranker model dir; null = teacher is cos only"}
    )
    reranker_adapter: str | None = field(default=None, metadata={"path": "cwd", "help": "optional re-ranker LoRA adapter"})
    reranker_dtype: str | None = field(
        default=None, metadata={"help": "re-ranker dtype override (float32|bfloat16|auto)"}
    )
    output_dir: str = field(default="", metadata={"path": "cwd", "help": "where teacher.jsonl and summary.json go"})
    query_file: str = field(default=mbeir.TRAIN_QUERY_FILE, metadata={"path": "data", "help": "training queries jsonl"})
    pool_file: str = field(default=mbeir.TRAIN_POOL_FILE, metadata={"path": "data", "help": "union training pool jsonl"})
    query_embeddings: str | None = field(
        default=None,
        metadata={
            "path": "cwd",
            "help": "sampled-query embedding dir; null = <output_dir>/embeddings/queries-<sample hash>"
        },
    )
    pool_embeddings: str | None = field(
        default=None, metadata={"path": "cwd", "help": "pool embedding dir; null = <output_dir>/embeddings/pool"}
    )
    fraction: float = field(default=0.1, metadata={"help": "fraction of each task's queries sampled"})
    min_per_task: int = field(default=1, metadata={"help": "at least this many queries per task"})
    max_per_task: int | None = field(
        default=None, metadata={"help": "at most this many queries per task (tests, smoke runs)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed (per task: seed, task name)"})
    top_k: int = field(default=50, metadata={"help": "candidates per query from the task's local pool"})
    default_weight: float = field(default=1.0, metadata={"help": "w in cos + w * P(Yes)"})
    task_weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS),
        metadata={"help": "per-task w by task name (mscoco_task0 = MSCOCO t->i, mscoco_task3 = i->t)"},
    )
    shard_queries: int = field(default=1000, metadata={"help": "queries per re-ranker shard (restart unit)"})
    decode_queries: int = field(default=4, metadata={"help": "queries per CPU decode task batch"})
    pairs_per_batch: int = field(default=64, metadata={"help": "pairs per re-ranker actor batch"})
    rerank_batch_size: int = field(default=16, metadata={"help": "pairs per re-ranker forward"})
    num_actors: int = field(default=0, metadata={"help": "re-ranker actors; 0 = one per GPU, or 1 on CPU"})
    actor_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per re-ranker actor"})
    decode_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per decode task"})
    torch_threads: int = field(default=0, metadata={"help": "torch threads per actor; 0 = actor_num_cpus"})
    use_gpu: str = field(default="auto", metadata={"help": "auto (if the cluster has GPUs) | true | false"})
    min_pixels: int | None = field(
        default=None, metadata={"help": "re-ranker image floor; null = its config"}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "re-ranker image budget; null = its config"}
    )
    index_backend: str = field(default="auto", metadata={"help": "auto | faiss | torch"})
    index_device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    index_shards: int = index_shards_option()
    index_shard_cpus: float = shard_cpus_option()
    ray_progress_bars: bool = field(default=False, metadata={"help": "show Ray Data's own progress bars"})
    embed: EmbedConfig = field(
        default_factory=EmbedConfig,
        metadata={
            "help": "embedding settings; input/output_dir/kind/model/adapter/data_root are set by the job"
        },
    )


@dataclass
class TeacherResult:
    """What one `run_teacher_scoring` call produced."""

    output_dir: Path
    teacher_path: Path
    counts: dict[str, Any]
    seconds: float
    summary: str = ""


# ---------------------------------------------------------------------------------------------
# Sampling, local pools, weights (pure)
# ---------------------------------------------------------------------------------------------


def stratified_sample(
    metas: Mapping[str, QueryMeta],
    fraction: float,
    seed: int = 0,
    min_per_task: int = 1,
    max_per_task: int | None = None,
) -> dict[str, list[str]]:
    """task -> sorted sampled qids: round(fraction * n) per task, clamped to [min_per_task, n].

    Deterministic: each task draws with its own RNG seeded by (seed, task), from its qids in
    sorted order, so the sample depends neither on file order nor on the other tasks.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    by_task: dict[str, list[str]] = {}
    for qid, m in metas.items():
        by_task.setdefault(m.task, []).append(qid)
    out: dict[str, list[str]] = {}
    for task in sorted(by_task):
        qids = sorted(by_task[task], key=qid_sort_key)
        n = max(min_per_task, math.floor(fraction * len(qids) + 0.5))
        if max_per_task is not None:
            n = min(n, max_per_task)
        n = min(n, len(qids))
        rng = random.Random(f"{seed}:{task}")
        out[task] = sorted(rng.sample(qids, n), key=qid_sort_key)
    return out


def local_pool_mask(
    did_dataset_ids: np.ndarray, modalities: np.ndarray, dataset_id: int, task_id: int
) -> np.ndarray:
    """Rows of the union train pool that form a task's local pool (same dataset, task's cand modality)."""
    cand_modality = mbeir.task_modalities(task_id)[1]
    return (did_dataset_ids == int(dataset_id)) & (modalities == cand_modality)


def task_weight(task: str, default: float, weights: Mapping[str, float]) -> float:
    """w of `task` in cos + w * P(Yes)."""
    return float(weights.get(task, default))


def teacher_scores(cos: Sequence[float], p_yes: Sequence[float] | None, weight: float) -> list[float]:
    """cos + weight * p_yes element-wise in double precision (cos alone without p_yes)."""
    if p_yes is None:
        return [float(c) for c in cos]
    return [float(c) + weight * float(p) for c, p in zip(cos, p_yes, strict=True)]


# ---------------------------------------------------------------------------------------------
# Ray Data stages
# ---------------------------------------------------------------------------------------------

PAIR_COLUMNS = (
    "shard",
    "qid",
    "rank",
    "q_text",
    "q_instruction",
    "q_image",
    "q_h",
    "q_w",
    "c_text",
    "c_image",
    "c_h",
    "c_w",
    "reject",
)


def _image_from_bytes(data: bytes | None, h: int, w: int) -> np.ndarray | None:
    """Rebuild the HxWx3 uint8 array `decode_pairs` flattened (None when there is none)."""
    if data is None or int(h) == 0:
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(int(h), int(w), 3)


def _read_at(f: Any, offset: int, length: int) -> bytes:
    f.seek(int(offset))
    return f.read(int(length))


def decode_pairs(
    batch: dict[str, np.ndarray],
    *,
    query_path: str,
    pool_path: str,
    data_root: str,
    instructions_path: str,
    prompt_index: int | None,
    seed: int,
    min_pixels: int,
    max_pixels: int,
) -> dict[str, np.ndarray]:
    """CPU stage: query rows (byte ranges of the query and its candidates) -> one row per pair.

    Items are built exactly as the embedding pipeline builds them (`decode.parse_row`: same text
    normalisation, same seeded instruction per qid); images leave as raw resized uint8 bytes. A
    query or candidate that cannot be decoded yields rows with `reject` set, not an exception.
    """
    cols: dict[str, list[Any]] = {c: [] for c in PAIR_COLUMNS}

    def parse(raw: bytes, kind: str) -> tuple[dict[str, Any] | None, str]:
        try:
            _, item, _ = decode.parse_row(
                raw, kind, data_root, instructions_path, prompt_index, seed, min_pixels, max_pixels
            )
            return item, ""
        except decode.RowReject as exc:
            return None, f"{kind} {exc.field}: {exc.reason}"

    with open(query_path, "rb") as fq, open(pool_path, "rb") as fp:
        for shard, qid, q_off, q_len, c_offs, c_lens in zip(
            batch["shard"],
            batch["qid"],
            batch["q_off"],
            batch["q_len"],
            batch["c_offs"],
            batch["c_lens"],
            strict=True,
        ):
            q_item, q_rej = parse(_read_at(fq, q_off, q_len), "query")
            q_img = q_item.get("image") if q_item else None
            for rank, (c_off, c_len) in enumerate(zip(c_offs, c_lens, strict=True)):
                c_item, c_rej = parse(_read_at(fp, c_off, c_len), "candidate")
                c_img = c_item.get("image") if c_item else None
                cols["shard"].append(int(shard))
                cols["qid"].append(str(qid))
                cols["rank"].append(rank)
                cols["q_text"].append(q_item.get("text") if q_item else None)
                cols["q_instruction"].append(q_item.get("instruction") if q_item else None)
                cols["q_image"].append(None if q_img is None else np.ascontiguousarray(q_img).tobytes())
                cols["q_h"].append(0 if q_img is None else int(q_img.shape[0]))
                cols["q_w"].append(0 if q_img is None else int(q_img.shape[1]))
                cols["c_text"].append(c_item.get("text") if c_item else None)
                cols["c_image"].append(None if c_img is None else np.ascontiguousarray(c_img).tobytes())
                cols["c_h"].append(0 if c_img is None else int(c_img.shape[0]))
                cols["c_w"].append(0 if c_img is None else int(c_img.shape[1]))
                cols["reject"].append(q_rej or c_rej)
    out: dict[str, np.ndarray] = {}
    for name, values in cols.items():
        if name in ("shard", "rank", "q_h", "q_w", "c_h", "c_w"):
            out[name] = np.asarray(values, dtype=np.int32)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
    return out


class RerankActor:
    """Ray Data actor: one `Reranker.load` per actor, P(Yes) for each valid pair of a batch.

    Rejected pairs pass through with NaN. If a batch fails, its pairs are scored one at a time and
    only the failing ones are rejected; if every pair fails alone the error is systemic and raised.
    """

    def __init__(
        self,
        reranker: str,
        adapter: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        torch_threads: int = 1,
        use_gpu: bool = False,
    ):
        import torch

        from umarvel_ray.model.reranker import Reranker
        from umarvel_ray.progress import quiet_known_noise

        quiet_known_noise()

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        overrides = {"dtype": dtype} if dtype else None
        self.reranker = Reranker.load(reranker, adapter=adapter, cfg_overrides=overrides)
        if use_gpu and torch.cuda.is_available():
            self.reranker.to("cuda")
        self.reranker.eval()
        self.batch_size = batch_size

    @staticmethod
    def _pairs(batch: dict[str, np.ndarray], rows: np.ndarray) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [
            (
                {
                    "text": batch["q_text"][i],
                    "image": _image_from_bytes(batch["q_image"][i], batch["q_h"][i], batch["q_w"][i]),
                    "instruction": batch["q_instruction"][i],
                },
                {
                    "text": batch["c_text"][i],
                    "image": _image_from_bytes(batch["c_image"][i], batch["c_h"][i], batch["c_w"][i]),
                    "instruction": None,
                },
            )
            for i in rows
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reject = np.array(batch["reject"], dtype=object)
        p_yes = np.full(len(reject), np.nan, dtype=np.float32)
        ok = np.flatnonzero(reject == "")
        if len(ok):
            pairs = self._pairs(batch, ok)
            try:
                p_yes[ok] = self.reranker.score(pairs, batch_size=self.batch_size)
            except Exception as batch_exc:  # noqa: BLE001 - isolate the bad pairs below
                failed = 0
                for pos, pair in zip(ok, pairs, strict=True):
                    try:
                        p_yes[pos] = self.reranker.score([pair], batch_size=1)[0]
                    except Exception as exc:  # noqa: BLE001
                        failed += 1
                        reject[pos] = f"rerank failed: {type(exc).__name__}: {exc}"
                if failed == len(ok):
                    raise batch_exc
        return {
            "shard": batch["shard"],
            "qid": batch["qid"],
            "rank": batch["rank"],
            "p_yes": p_yes,
            "reject": reject,
        }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class _Query:
    meta: QueryMeta
    candidates: list[str]
    cos: list[float]


def validate_config(cfg: TeacherConfig) -> tuple[Path, Path, Path, Path]:
    """(data_root, query file, pool file, output dir) after checking the config."""
    if not cfg.data_root or not Path(cfg.data_root).expanduser().is_dir():
        raise ConfigError(f"data_root must be an existing directory, got {cfg.data_root!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required")
    if not 0.0 < cfg.fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.min_per_task < 0 or (cfg.max_per_task is not None and cfg.max_per_task < 1):
        raise ConfigError("min_per_task must be >= 0 and max_per_task >= 1 (or null)")
    for name in ("top_k", "shard_queries", "decode_queries", "pairs_per_batch", "rerank_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"use_gpu must be auto, true or false, got {cfg.use_gpu!r}")
    if cfg.index_shards < 0 or cfg.index_shard_cpus <= 0:
        raise ConfigError("index_shards must be >= 0 and index_shard_cpus > 0")
    known = {t.name for t in mbeir.MBEIR_TASKS}
    unknown = sorted(set(cfg.task_weights) - known)
    if unknown:
        log.warning("task_weights names no M-BEIR evaluation task: %s", unknown)
    for name in ("model", "reranker"):
        v = getattr(cfg, name)
        if v and not Path(v).expanduser().is_dir():
            raise ConfigError(f"{name} directory not found: {v}")
    return job_train_inputs(cfg.data_root, cfg.query_file, cfg.pool_file, cfg.output_dir)


def scan_offsets(path: Path, wanted: set[str], id_key: str = "did") -> dict[str, tuple[int, int]]:
    """id -> (byte offset, byte length) of its line's content (`data.jsonl` lines), for the ids in
    `wanted` (first occurrence)."""
    from umarvel_ray.data.jsonl import iter_file_lines, parse_json

    out: dict[str, tuple[int, int]] = {}
    for ln in iter_file_lines(path):
        if ln.blank:
            continue
        obj, _ = parse_json(ln.content)  # a malformed line has no id; the embedding job rejects it
        rid = obj.get(id_key) if isinstance(obj, dict) else None
        if rid in wanted and rid not in out:
            out[rid] = (ln.start, len(ln.content))
            if len(out) == len(wanted):
                break
    return out


def reranker_pixels(path: str, adapter: str | None) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the re-ranker's saved config, without loading weights."""
    from umarvel_ray.model.saved import saved_pixel_budget, saved_reranker_config

    return saved_pixel_budget(saved_reranker_config(path, adapter))


class LocalPool:
    """Row filter of one task's local pool (`local_pool_mask` on a batch of the union pool's ids and
    modalities); picklable, so search shard actors apply it to their slice of the store."""

    def __init__(self, dataset_id: int, task_id: int) -> None:
        self.dataset_id, self.task_id = int(dataset_id), int(task_id)

    def __call__(self, batch: Any) -> np.ndarray:
        ids = batch.ids.tolist()
        ds = np.fromiter((mbeir.split_id(d)[0] for d in ids), dtype=np.int64, count=len(ids))
        return local_pool_mask(ds, np.asarray(batch.modalities).astype(str), self.dataset_id, self.task_id)


def retrieve_local(
    queries: list[QueryMeta],
    q_dir: Path,
    p_dir: Path,
    top_k: int,
    backend: str,
    device: str,
    shards: int = 0,
    shard_cpus: float = 1.0,
) -> tuple[list[_Query], list[str]]:
    """Top-k of every query over its task's local pool; also the qids whose local pool is empty.

    `shards` > 0: the local pools are built by that many search actors from the store on disk
    (`index.service`), so the driver reads the pool's ids and modalities but none of its vectors.
    """
    from umarvel_ray.index import build_index
    from umarvel_ray.index.service import SearchService
    from umarvel_ray.store import read_embeddings

    q_emb = read_embeddings(q_dir, columns=("id", "vector"))
    row_of = {qid: i for i, qid in enumerate(q_emb.ids.tolist())}
    pool = read_embeddings(p_dir, columns=("id", "modality") if shards else ("id", "modality", "vector"))
    assert pool.modalities is not None and q_emb.vectors is not None
    pool_ds = np.fromiter(
        (mbeir.split_id(d)[0] for d in pool.ids.tolist()), dtype=np.int64, count=len(pool.ids)
    )
    pool_mod = pool.modalities.astype(str)
    by_task: dict[tuple[int, int], list[QueryMeta]] = {}
    for m in queries:
        if m.qid in row_of:
            by_task.setdefault((m.dataset_id, m.task_id), []).append(m)
    found: list[_Query] = []
    no_pool: list[str] = []
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(SearchService(shards, shard_cpus, device=device)) if shards else None
        for (ds, task_id), metas in sorted(by_task.items()):
            mask = local_pool_mask(pool_ds, pool_mod, ds, task_id)
            if not mask.any():
                no_pool += [m.qid for m in metas]
                log.warning("task %s: empty local pool, %d queries skipped", metas[0].task, len(metas))
                continue
            if service is None:
                assert pool.vectors is not None
                index: Any = build_index(pool.vectors[mask], pool.ids[mask], backend=backend, device=device)
            else:
                keep = LocalPool(ds, task_id)
                index = service.build_from_embeddings(p_dir, row_filter=keep, backend=backend)
            k = min(top_k, int(mask.sum()))
            scores, ids = index.search_arrays(q_emb.vectors[[row_of[m.qid] for m in metas]], k)
            for m, s_row, i_row in zip(metas, scores, ids, strict=True):
                found.append(_Query(m, [str(d) for d in i_row], [float(x) for x in s_row]))
            n_pool = int(mask.sum())
            log.info("task %s: %d queries, local pool %d, top-%d", metas[0].task, len(metas), n_pool, k)
    found.sort(key=lambda q: qid_sort_key(q.meta.qid))
    return found, no_pool


def _shard_key(base: dict[str, Any], shard: list[_Query]) -> str:
    h = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
    for q in shard:
        h.update(json.dumps([q.meta.qid, q.candidates]).encode())
    return h.hexdigest()


def _shard_path(out: Path, i: int) -> Path:
    return out / SHARDS_DIR / f"teacher-{i:05d}.json"


def _load_shard(path: Path, key: str) -> dict[str, list[float | None]] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data["p_yes"] if data.get("key") == key else None


def _use_gpu(mode: str) -> bool:
    from umarvel_ray.runtime import cluster_gpus

    if mode == "false":
        return False
    gpus = cluster_gpus()
    if mode == "true" and gpus < 1:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPU")
    return gpus >= 1


def _run_reranker(
    cfg: TeacherConfig,
    pending: dict[int, list[_Query]],
    keys: dict[int, str],
    offsets: dict[str, tuple[int, int]],
    paths: dict[str, str],
    pixels: tuple[int, int],
    out: Path,
) -> int:
    """Score the pending shards on Ray; commit each shard file as soon as all its pairs are in."""
    import ray.data
    from ray.data import DataContext

    from umarvel_ray.progress import Progress
    from umarvel_ray.runtime import actor_pool, cluster_gpus, ensure_ray

    ensure_ray(cfg.embed.ray_address)
    use_gpu = _use_gpu(cfg.use_gpu)
    rows = [
        {
            "shard": s,
            "qid": q.meta.qid,
            "q_off": q.meta.offset,
            "q_len": q.meta.length,
            "c_offs": [offsets[d][0] for d in q.candidates],
            "c_lens": [offsets[d][1] for d in q.candidates],
        }
        for s, shard in sorted(pending.items())
        for q in shard
    ]
    expected = {s: sum(len(q.candidates) for q in shard) for s, shard in pending.items()}
    results: dict[int, dict[str, list[float | None]]] = {
        s: {q.meta.qid: [None] * len(q.candidates) for q in shard} for s, shard in pending.items()
    }
    received = dict.fromkeys(pending, 0)
    n_blocks = max(1, math.ceil(len(rows) / cfg.decode_queries))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
        decode_pairs,
        batch_size=cfg.decode_queries,
        batch_format="numpy",
        fn_kwargs={**paths, "min_pixels": pixels[0], "max_pixels": pixels[1]},
        num_cpus=cfg.decode_num_cpus,
    )
    n_actors = cfg.num_actors or (max(1, int(cluster_gpus())) if use_gpu else 1)
    threads = cfg.torch_threads or max(1, int(cfg.actor_num_cpus))
    ds = ds.map_batches(
        RerankActor,
        fn_constructor_kwargs={
            "reranker": cfg.reranker,
            "adapter": cfg.reranker_adapter,
            "dtype": cfg.reranker_dtype,
            "batch_size": cfg.rerank_batch_size,
            "torch_threads": 0 if use_gpu and not cfg.torch_threads else threads,
            "use_gpu": use_gpu,
        },
        batch_size=cfg.pairs_per_batch,
        batch_format="numpy",
        num_cpus=cfg.actor_num_cpus,
        num_gpus=1 if use_gpu else 0,
        **actor_pool(n_actors, n_actors),
    )
    ctx = DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = cfg.ray_progress_bars
    progress = Progress("teacher rerank", total=sum(expected.values()), unit="pairs")
    rejected = 0
    it: Iterator[dict[str, np.ndarray]] = ds.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for batch in it:
            for s, qid, rank, p, rej in zip(
                batch["shard"], batch["qid"], batch["rank"], batch["p_yes"], batch["reject"], strict=True
            ):
                s = int(s)
                if rej:
                    rejected += 1
                    log.warning("pair %s rank %d rejected: %s", qid, int(rank), rej)
                else:
                    results[s][str(qid)][int(rank)] = float(p)
                received[s] += 1
                if received[s] == expected[s]:
                    atomic_write_json(_shard_path(out, s), {"key": keys[s], "p_yes": results.pop(s)})
            progress.update(len(batch["qid"]))
    finally:
        ctx.enable_progress_bars = old_bars
    incomplete = sorted(s for s in pending if received[s] != expected[s])
    if incomplete:
        raise RuntimeError(f"re-ranker pipeline ended with incomplete shards {incomplete}")
    return rejected


def run_teacher_scoring(cfg: TeacherConfig) -> TeacherResult:
    """Sample, embed, retrieve top-k per local pool, score with the re-ranker; write teacher.jsonl."""
    require_absolute(cfg)
    from umarvel_ray.progress import summary

    t0 = time.perf_counter()
    root, qf, pf, out = validate_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)

    metas, _, n_read, invalid = read_query_meta(qf)
    sample = stratified_sample(metas, cfg.fraction, cfg.seed, cfg.min_per_task, cfg.max_per_task)
    chosen = sorted((metas[q] for qids in sample.values() for q in qids), key=lambda m: m.offset)
    log.info("sampled %d of %d queries over %d tasks", len(chosen), len(metas), len(sample))

    with qf.open("rb") as f:
        lines = [_read_at(f, m.offset, m.length) for m in chosen]
    lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in lines]
    tag = hashlib.sha256(b"".join(lines)).hexdigest()[:12]
    # One default directory per sample, so a new fraction/seed never collides with an old one.
    q_dir = (
        Path(cfg.query_embeddings).expanduser()
        if cfg.query_embeddings
        else out / "embeddings" / f"queries-{tag}"
    )
    p_dir = Path(cfg.pool_embeddings).expanduser() if cfg.pool_embeddings else out / "embeddings" / "pool"
    q_input = subset_input(qf, lines, q_dir, f"{qf.stem}.sample-{tag}.jsonl")
    common = dict(data_root=root, model=cfg.model, adapter=cfg.adapter)
    ensure_embeddings(cfg.embed, kind="candidate", input_path=pf, output_dir=p_dir, **common)
    ensure_embeddings(cfg.embed, kind="query", input_path=q_input, output_dir=q_dir, **common)

    found, no_pool = retrieve_local(
        chosen, q_dir, p_dir, cfg.top_k, cfg.index_backend, cfg.index_device,
        cfg.index_shards, cfg.index_shard_cpus,
    )  # fmt: skip
    not_embedded = len(chosen) - len(found) - len(no_pool)

    p_yes: dict[str, list[float | None]] = {}
    shards_written = shards_skipped = pairs_rejected = 0
    if cfg.reranker:
        instr = resolve(root, cfg.embed.instructions)
        min_px, max_px = reranker_pixels(cfg.reranker, cfg.reranker_adapter)
        pixels = (cfg.min_pixels or min_px, cfg.max_pixels or max_px)
        paths = {
            "query_path": str(qf),
            "pool_path": str(pf),
            "data_root": str(root),
            "instructions_path": str(instr),
            "prompt_index": cfg.embed.prompt_index,
            "seed": cfg.embed.instruction_seed,
        }
        base = {
            "reranker": str(Path(cfg.reranker).resolve()),
            "signature": model_signature(Path(cfg.reranker), cfg.reranker_adapter),
            "adapter": cfg.reranker_adapter,
            "dtype": cfg.reranker_dtype,
            "pixels": list(pixels),
            "inputs": paths,
            "files": [_file_id(qf), _file_id(pf)],
        }
        shards = {
            i // cfg.shard_queries: found[i : i + cfg.shard_queries]
            for i in range(0, len(found), cfg.shard_queries)
        }
        keys = {s: _shard_key(base, shard) for s, shard in shards.items()}
        pending: dict[int, list[_Query]] = {}
        for s, shard in shards.items():
            if _load_shard(_shard_path(out, s), keys[s]) is None:
                pending[s] = shard
        shards_skipped = len(shards) - len(pending)
        log.info("re-ranker shards: %d to score, %d already done", len(pending), shards_skipped)
        if pending:
            wanted = {d for shard in pending.values() for q in shard for d in q.candidates}
            offsets = scan_offsets(pf, wanted)
            missing = wanted - set(offsets)
            if missing:
                raise RuntimeError(
                    f"{len(missing)} retrieved candidates not found in {pf}, e.g. {sorted(missing)[:3]}"
                )
            pairs_rejected = _run_reranker(cfg, pending, keys, offsets, paths, pixels, out)
            shards_written = len(pending)
        for s in shards:
            loaded = _load_shard(_shard_path(out, s), keys[s])
            if loaded is None:
                raise RuntimeError(f"shard {s} missing after scoring")
            p_yes.update(loaded)

    records: list[dict[str, Any]] = []
    per_task: dict[str, dict[str, Any]] = {}
    n_pairs = n_dropped = 0
    for q in found:
        w = task_weight(q.meta.task, cfg.default_weight, cfg.task_weights)
        cands, cos, probs = q.candidates, q.cos, None
        if cfg.reranker:
            row = p_yes[q.meta.qid]
            keep = [i for i, p in enumerate(row) if p is not None]
            n_dropped += len(row) - len(keep)
            cands, cos, probs = (
                [cands[i] for i in keep],
                [cos[i] for i in keep],
                [float(row[i]) for i in keep],
            )
        scores = teacher_scores(cos, probs, w)
        n_pairs += len(cands)
        t = per_task.setdefault(q.meta.task, {"queries": 0, "pairs": 0, "weight": w})
        t["queries"] += 1
        t["pairs"] += len(cands)
        records.append(
            {
                "qid": q.meta.qid,
                "task": q.meta.task,
                "weight": w,
                "candidates": cands,
                "cos": cos,
                "p_yes": probs,
                "scores": scores,
            }
        )
    teacher_path = write_teacher(out, records)
    seconds = time.perf_counter() - t0
    counts: dict[str, Any] = {
        "queries_read": n_read,
        "queries_invalid": invalid,
        "tasks": len(sample),
        "queries_sampled": len(chosen),
        "queries_not_embedded": not_embedded,
        "queries_no_local_pool": len(no_pool),
        "queries_written": len(records),
        "pairs": n_pairs,
        "pairs_rejected": pairs_rejected,
        "pairs_dropped": n_dropped,
        "shards_written": shards_written,
        "shards_skipped": shards_skipped,
        "reranker": cfg.reranker or "none (teacher = cos only)",
    }
    atomic_write_json(
        out / SUMMARY_NAME,
        {
            "counts": counts,
            "per_task": dict(sorted(per_task.items())),
            "sampled_per_task": {t: len(q) for t, q in sample.items()},
            "fraction": cfg.fraction,
            "top_k": cfg.top_k,
            "teacher": "cos + w * p_yes" if cfg.reranker else "cos (no re-ranker given)",
            "query_embeddings": str(q_dir),
            "pool_embeddings": str(p_dir),
            "no_local_pool": sorted(no_pool, key=qid_sort_key),
            "seconds": round(seconds, 2),
        },
    )
    if not cfg.reranker:
        log.warning("no re-ranker given: teacher scores are the embedder's cos only")
    line = summary("teacher", **counts, seconds=f"{seconds:.1f}", output=str(teacher_path))
    return TeacherResult(out, teacher_path, counts, seconds, line)


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


__all__ = [
    "RerankActor",
    "TeacherConfig",
    "TeacherResult",
    "decode_pairs",
    "local_pool_mask",
    "run_teacher_scoring",
    "stratified_sample",
    "task_weight",
    "teacher_scores",
]
