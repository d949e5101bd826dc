"""The re-ranker's Ray Data pipeline (the teacher's second pipeline, after the embedding one).

CPU decode tasks (`decode_pairs`: query and candidate lines read by byte offset, images decoded
under the re-ranker's pixel budget) feed an actor pool of `RerankActor`s (one `Reranker.load` per
actor, a GPU each when the cluster has GPUs), which give P(Yes) for every (query, candidate) pair.
`run_reranker` runs it over the pending shards and hands each shard to its caller as soon as all
of the shard's pairs are in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError
from umarvel_ray.embed import decode
from umarvel_ray.index.local_pool import RetrievedQuery
from umarvel_ray.teacher.config import TeacherConfig
from umarvel_ray.teacher.offsets import read_at

log = logging.getLogger("umarvel_ray.teacher")

ShardPYes = dict[str, list[float | None]]  # qid -> P(Yes) per candidate rank (None: rejected)


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
            q_item, q_rej = parse(read_at(fq, q_off, q_len), "query")
            q_img = q_item.get("image") if q_item else None
            for rank, (c_off, c_len) in enumerate(zip(c_offs, c_lens, strict=True)):
                c_item, c_rej = parse(read_at(fp, c_off, c_len), "candidate")
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


def reranker_pixels(path: str, adapter: str | None) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the re-ranker's saved config, without loading weights."""
    from umarvel_ray.model.reranker import saved_reranker_config
    from umarvel_ray.model.saved import saved_pixel_budget

    return saved_pixel_budget(saved_reranker_config(path, adapter))


def _use_gpu(mode: str) -> bool:
    from umarvel_ray.runtime import cluster_gpus

    if mode == "false":
        return False
    gpus = cluster_gpus()
    if mode == "true" and gpus < 1:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPU")
    return gpus >= 1


def _pair_rows(pending: dict[int, list[RetrievedQuery]], offsets: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One input row per query: its shard, qid, and the byte ranges of its line and its candidates'."""
    return [
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


def _rerank_dataset(
    cfg: TeacherConfig, rows: list[dict[str, Any]], paths: dict[str, Any], pixels: tuple[int, int], use_gpu: bool
) -> Any:
    """The lazy Dataset: `decode_queries` queries per CPU decode task -> `RerankActor` pool."""
    import ray.data

    from umarvel_ray.runtime import actor_pool, cluster_gpus

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
    return ds.map_batches(
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


class _ShardCollector:
    """P(Yes) of each pending shard as the pipeline's batches arrive (in any order); a shard is
    handed to `commit` the moment its last pair is in, so an interrupted run keeps finished shards."""

    def __init__(self, pending: dict[int, list[RetrievedQuery]], commit: Callable[[int, ShardPYes], None]):
        self.expected = {s: sum(len(q.candidates) for q in shard) for s, shard in pending.items()}
        self.results: dict[int, ShardPYes] = {
            s: {q.meta.qid: [None] * len(q.candidates) for q in shard} for s, shard in pending.items()
        }
        self.received = dict.fromkeys(pending, 0)
        self.commit = commit
        self.rejected = 0

    def take(self, batch: dict[str, np.ndarray]) -> None:
        """Record one output batch: P(Yes) of its valid pairs, a logged reject for the others."""
        for s, qid, rank, p, rej in zip(
            batch["shard"], batch["qid"], batch["rank"], batch["p_yes"], batch["reject"], strict=True
        ):
            s = int(s)
            if rej:
                self.rejected += 1
                log.warning("pair %s rank %d rejected: %s", qid, int(rank), rej)
            else:
                self.results[s][str(qid)][int(rank)] = float(p)
            self.received[s] += 1
            if self.received[s] == self.expected[s]:
                self.commit(s, self.results.pop(s))

    def incomplete(self) -> list[int]:
        """Shards still missing pairs (after the pipeline ended: a lost batch, never silently)."""
        return sorted(s for s in self.expected if self.received[s] != self.expected[s])


def run_reranker(
    cfg: TeacherConfig,
    pending: dict[int, list[RetrievedQuery]],
    offsets: dict[str, tuple[int, int]],
    paths: dict[str, Any],
    pixels: tuple[int, int],
    commit: Callable[[int, ShardPYes], None],
) -> int:
    """Score the pending shards on Ray; `commit(shard, p_yes)` each as soon as all its pairs are in.

    Returns the number of rejected pairs (undecodable, or failing alone in the re-ranker).
    """
    from ray.data import DataContext

    from umarvel_ray.progress import Progress
    from umarvel_ray.runtime import ensure_ray

    ensure_ray(cfg.embed.ray_address)
    use_gpu = _use_gpu(cfg.use_gpu)
    rows = _pair_rows(pending, offsets)
    collector = _ShardCollector(pending, commit)
    ds = _rerank_dataset(cfg, rows, paths, pixels, use_gpu)
    ctx = DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = cfg.ray_progress_bars
    progress = Progress("teacher rerank", total=sum(collector.expected.values()), unit="pairs")
    it: Iterator[dict[str, np.ndarray]] = ds.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for batch in it:
            collector.take(batch)
            progress.update(len(batch["qid"]))
    finally:
        ctx.enable_progress_bars = old_bars
    incomplete = collector.incomplete()
    if incomplete:
        raise RuntimeError(f"re-ranker pipeline ended with incomplete shards {incomplete}")
    return collector.rejected
