"""Sharded search as a Ray service: the pool split over N actors, queried by fan-out + exact merge.

Why: M-BEIR's global pool is 5.6M candidates; at 3,584 dims that is 40 GB of fp16 vectors, more
than a driver (or one GPU) should hold. Each `ShardWorker` actor builds its shard itself, from
its contiguous slice of the embedding store on disk (or loads its part of a saved index), so the
driver never holds a vector of the pool. A search sends the queries to every actor; each returns
its own top-k under the ordering contract of `index.base` (score desc, ties by id asc, tie groups
at the cut-off fetched whole), and `merge_topk` takes the global top-k of their union. That is
exact: every member of the global top-k is in its own shard's top-k under the same total order,
so for exact factories (Flat, SQfp16, torch) the results equal one in-process index bit for bit
(same ids, same order, same scores). Approximate factories train codebooks per shard, so their
results are approximate in a different way than one index's.

Scheduling: actors go out with Ray's SPREAD strategy (one per node while nodes last) and one
GPU each when the cluster has GPUs and the device allows. They are owned by the process that
made the service and are killed by `close()` (or leaving the `with` block); Ray kills them too if
that process dies, so none outlives a job or a Serve replica.

    with SearchService(2) as svc:
        svc.build_from_embeddings("runs/emb/pool-global")
        scores, ids = svc.search_arrays(queries, k=100)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.index.base import (
    FORMAT_VERSION,
    METRIC,
    PAD_ID,
    artifact,
    as_queries,
    base_path,
    merge_topk,
)
from umarvel_ray.index.options import index_shards_option, shard_cpus_option
from umarvel_ray.index.shard_worker import IdSubset, ShardWorker, split_rows
from umarvel_ray.io import atomic_write_json

log = logging.getLogger("umarvel_ray")

BACKEND = "ray-sharded"
def pool_index(
    directory: str | os.PathLike[str],
    shards: int = 0,
    shard_cpus: float = 1.0,
    row_filter: Any = None,
    **opts: Any,
) -> Any:
    """The index a job searches a pool with: in-process (`shards=0`, `build_index_from_embeddings`)
    or a `SearchService` of `shards` actors. Use it as a context manager (both close the same way).
    `opts`: factory, fp16, device, backend, nprobe (as build_index_from_embeddings)."""
    if shards <= 0:
        from umarvel_ray.index.build import build_index_from_embeddings

        return build_index_from_embeddings(directory, row_filter=row_filter, **opts)
    service = SearchService(shards, num_cpus=shard_cpus, device=opts.pop("device", "auto"))
    try:
        return service.build_from_embeddings(directory, row_filter=row_filter, **opts)
    except BaseException:
        service.close()
        raise


class SearchService:
    """N `ShardWorker` actors searched as one index (`search_arrays` / `search` like SearchIndex).

    Build with `build_from_embeddings` (each actor reads its slice of the store), `build_from_arrays`
    (tests, benches) or `load` (a saved index); a new build replaces the previous one on the same
    actors. `num_gpus=None` gives each actor one GPU when the cluster has at least one per shard
    and `device` is not "cpu". Raises ValueError when the cluster cannot hold the actors.
    """

    backend = BACKEND

    def __init__(
        self,
        num_shards: int,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        device: str = "auto",
        strategy: str = "SPREAD",
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        import ray

        from umarvel_ray.runtime import ensure_ray

        self._started_ray = ensure_ray(include_dashboard=False)
        self.num_shards = int(num_shards)
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0.0))
        if num_gpus is None:
            num_gpus = 1.0 if device != "cpu" and gpus >= num_shards else 0.0
        if num_shards * num_cpus > float(res.get("CPU", 0.0)) or num_shards * num_gpus > gpus:
            self.close()
            raise ValueError(
                f"{num_shards} search shards x ({num_cpus} CPU, {num_gpus} GPU) do not fit the Ray "
                f"cluster ({res.get('CPU', 0)} CPUs, {gpus} GPUs): lower index_shards or index_shard_cpus"
            )
        worker = ray.remote(ShardWorker)
        self.actors = [
            worker.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategy).remote(
                i, self.num_shards, threads=max(1, int(num_cpus))
            )
            for i in range(self.num_shards)
        ]
        self.infos: list[dict[str, Any]] = []
        self.device = device

    def ready(self) -> SearchService:
        """Wait until every actor has started (process up, index modules imported)."""
        import ray

        ray.get([a.ready.remote() for a in self.actors])
        return self

    # -- building -------------------------------------------------------------------------
    def _built(self, futures: list[Any], unique: bool = True) -> SearchService:
        import ray

        self.infos = ray.get(futures)
        if unique and self.num_shards > 1:
            self._check_unique_across_shards()
        log.info(
            "search service: %d shards built (%s rows) on %d node(s)",
            self.num_shards,
            "+".join(str(i["count"]) for i in self.infos),
            len({i["node"] for i in self.infos}),
        )
        return self

    def build_from_embeddings(
        self,
        directory: str | os.PathLike[str],
        row_filter: Any = None,
        factory: str = "Flat",
        fp16: bool = False,
        backend: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        train_rows: int = 100_000,
        seed: int = 0,
        batch_rows: int = 65_536,
    ) -> SearchService:
        """Every actor indexes its contiguous slice of the store's rows (kept by `row_filter`)."""
        from umarvel_ray.index.build import file_row_counts

        n = sum(file_row_counts(directory))
        opts = dict(
            factory=factory, fp16=fp16, device=self.device, backend=backend, nprobe=nprobe,
            ef_search=ef_search, train_rows=train_rows, seed=seed, batch_rows=batch_rows,
        )  # fmt: skip
        d = str(Path(directory).resolve())
        slices = split_rows(n, self.num_shards)
        return self._built(
            [
                a.build_from_embeddings.remote(d, s, opts, row_filter)
                for a, s in zip(self.actors, slices, strict=True)
            ]
        )

    def build_from_arrays(
        self, vectors: np.ndarray, ids: Sequence[str] | np.ndarray, **opts: Any
    ) -> SearchService:
        """Split in-memory vectors [N, D] into contiguous shards (the driver holds them: tests, benches)."""
        import ray

        v = np.ascontiguousarray(vectors, dtype=np.float32)
        id_arr = np.asarray(ids, dtype=object)
        if v.ndim != 2 or len(v) != len(id_arr):
            raise ValueError(f"vectors must be [N, D] with N = len(ids), got {v.shape} and {len(id_arr)} ids")
        opts = {"device": self.device, **opts}
        futures = [
            a.build_from_arrays.remote(ray.put(id_arr[lo:hi]), ray.put(v[lo:hi]), opts)
            for a, (lo, hi) in zip(self.actors, split_rows(len(v), self.num_shards), strict=True)
        ]
        return self._built(futures)

    def load(self, path: str | os.PathLike[str], backend: str | None = None) -> SearchService:
        """A saved index: a sharded save's files go round-robin to the actors (each loads only its
        own); a single-file exact index is read by every actor, which keeps its slice of rows
        (transiently one whole copy per actor: save it sharded to avoid that)."""
        p = str(base_path(Path(path).resolve()))
        return self._built([a.load.remote(p, self.device, backend) for a in self.actors], unique=False)

    def _check_unique_across_shards(self) -> None:
        """Duplicate ids in two shards would both be returned; checked with 8-byte hashes only."""
        import ray

        hashes = np.concatenate(ray.get([a.id_hashes.remote() for a in self.actors]))
        hashes.sort()
        clash = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if not len(clash):
            return
        found = [s for part in ray.get([a.ids_with_hashes.remote(clash) for a in self.actors]) for s in part]
        seen: set[str] = set()
        dups = sorted({s for s in found if s in seen or seen.add(s)})
        if dups:
            raise ValueError(f"{len(dups)} duplicate ids across search shards, e.g. {dups[:3]}")

    # -- what SearchIndex callers read ----------------------------------------------------
    def _require_built(self) -> None:
        if not self.infos:
            raise RuntimeError("the search service holds no index yet (build_from_embeddings / load)")

    def __len__(self) -> int:
        return int(sum(i["count"] for i in self.infos))

    @property
    def dim(self) -> int:
        self._require_built()
        return int(self.infos[0]["dim"])

    @property
    def factory(self) -> str:
        self._require_built()
        return str(self.infos[0]["factory"])

    @property
    def ids(self) -> np.ndarray:
        """All ids (object array, shard order) gathered from the actors: the driver pays ~ids only."""
        import ray

        self._require_built()
        return np.concatenate(
            [np.asarray(x, dtype=object) for x in ray.get([a.ids.remote() for a in self.actors])]
        )

    def first_ids(self, n: int) -> list[str]:
        """Up to n ids from the front of each shard (spot checks without gathering every id)."""
        import ray

        self._require_built()
        return [s for part in ray.get([a.ids.remote(n) for a in self.actors]) for s in part.tolist()]

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        import ray

        ray.get([a.set_search_params.remote(nprobe, ef_search) for a in self.actors])

    # -- search ---------------------------------------------------------------------------
    def search_arrays(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query over all shards: (scores float32 [nq, k], ids object [nq, k]), exactly as
        one SearchIndex over the whole pool orders and pads them."""
        import ray

        out_s, out_i, pending = self._fan_out(queries, k, batch_size)
        for start, futures in pending:
            s, i = merge_topk(ray.get(futures), k)
            out_s[start : start + len(s)], out_i[start : start + len(s)] = s, i
        return out_s, out_i

    def _fan_out(
        self, queries: np.ndarray, k: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[Any]]]]:
        """Padded outputs [nq, k] and, per query block, every shard's pending search."""
        import ray

        if k <= 0:
            raise ValueError("k must be > 0")
        self._require_built()
        q = as_queries(queries, self.dim)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), PAD_ID, dtype=object)
        pending: list[tuple[int, list[Any]]] = []
        if len(self) == 0:
            return out_s, out_i, pending
        for start in range(0, len(q), batch_size):  # all blocks go out at once: actors overlap the merge
            ref = ray.put(q[start : start + batch_size])
            pending.append((start, [a.search.remote(ref, k, batch_size) for a in self.actors]))
        return out_s, out_i, pending

    async def search_arrays_async(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search_arrays` for an event loop (a Serve replica): awaits the shards instead of ray.get."""
        import asyncio

        out_s, out_i, pending = self._fan_out(queries, k, batch_size)
        for start, futures in pending:
            s, i = merge_topk(await asyncio.gather(*futures), k)
            out_s[start : start + len(s)], out_i[start : start + len(s)] = s, i
        return out_s, out_i

    def search(
        self, queries: np.ndarray, k: int, batch_size: int = 1024
    ) -> tuple[np.ndarray, list[list[str]]]:
        scores, ids = self.search_arrays(queries, k, batch_size)
        return scores, ids.tolist()

    # -- persistence and lifetime ---------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """`<path>.shard-NNNNN` per actor + `<path>.meta.json`: the format of `ShardedIndex.save`,
        so `load_index` reads it in one process and `load` back into actors."""
        import ray

        self._require_built()
        p = base_path(Path(path).resolve())
        p.parent.mkdir(parents=True, exist_ok=True)
        names = ray.get(
            [a.save.remote(str(p.with_name(f"{p.name}.shard-{i:05d}"))) for i, a in enumerate(self.actors)]
        )
        meta = {
            "format_version": FORMAT_VERSION, "backend": "sharded", "dim": self.dim, "count": len(self),
            "metric": METRIC, "shards": names,
        }  # fmt: skip
        atomic_write_json(artifact(p, ".meta.json"), meta)
        return p

    def close(self) -> None:
        """Kill the shard actors (idempotent); shuts down a Ray this service itself started."""
        import ray

        actors = list(getattr(self, "actors", []))
        for a in actors:
            ray.kill(a, no_restart=True)
        _wait_dead(actors)
        self.actors = []
        self.infos = []
        if getattr(self, "_started_ray", False) and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_dead(actors: list[Any], timeout_s: float = 30.0) -> None:
    """Return once every killed actor refuses calls (its CPUs are back), or after `timeout_s`.

    `ray.kill` only sends the request: a call made right after it can still be served (CI saw
    one), so a caller that relies on the actors being gone would race without this wait.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.05)


__all__ = [
    "BACKEND",
    "IdSubset",
    "SearchService",
    "ShardWorker",
    "index_shards_option",
    "pool_index",
    "shard_cpus_option",
]
