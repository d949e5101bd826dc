"""faiss backend: IDMap2-wrapped inner-product index built from a factory string.

The IDMap2 (holding M-BEIR int ids or positions) is what gets saved, so the `.faiss` file is
usable on its own; searching goes through the wrapped index and maps positions to our string
ids, which lets the same code search a GPU clone (faiss-gpu clones the inner index, not the
IDMap). The CPU index stays authoritative; the GPU clone is made on first search after adds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from umarvel_ray.index import ids as idm
from umarvel_ray.index.base import (
    SearchIndex,
    artifact,
    atomic_save_npy,
    base_path,
    ids_for_save,
    require_finite,
)
from umarvel_ray.index.factory import RULE, min_train_vectors
from umarvel_ray.io import atomic_write_json

log = logging.getLogger("umarvel_ray")

GPU_MAX_K = 2048  # faiss-gpu's top-k limit; wider (tie-widening) searches run on the CPU copy


def require_faiss() -> ModuleType:
    """Import faiss lazily so that modules without search needs never pay for (or need) it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only where faiss is absent
        raise ImportError(
            "faiss is required for this index: pip install faiss-cpu "
            "(or pip install 'umarvel-ray[gpu]' for faiss-gpu)"
        ) from e
    return faiss


def faiss_available() -> bool:
    try:
        require_faiss()
    except ImportError:
        return False
    return True


def faiss_num_gpus() -> int:
    """GPUs faiss itself can use (0 for faiss-cpu builds)."""
    if not faiss_available():
        return 0
    faiss = require_faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def is_exact_factory(factory: str) -> bool:
    """Flat (fp32 or fp16 storage) factories are exhaustive: results equal brute force."""
    return factory.replace(" ", "") in ("Flat", "SQfp16")


def resolve_factory(factory: str, fp16: bool) -> str:
    """Apply fp16 storage to a factory string ("Flat" -> "SQfp16", "IVF256,Flat" -> "IVF256,SQfp16")."""
    f = factory.replace(" ", "")
    if not fp16:
        return f
    if f == "Flat":
        return "SQfp16"
    if f.endswith(",Flat"):
        return f[: -len("Flat")] + "SQfp16"
    if re.fullmatch(r"HNSW\d+", f):
        return f + ",SQfp16"
    if "fp16" in f or "SQ" in f or "PQ" in f:
        return f  # already a compressed encoding: fp16 adds nothing
    raise ValueError(f"cannot apply fp16 storage to factory {factory!r}; write the encoding into it")


class FaissIndex(SearchIndex):
    """Inner-product faiss index ("Flat" exact by default; IVF/HNSW/... by factory string)."""

    backend = "faiss"

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        fp16: bool = False,
        device: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        shard: bool = True,
    ) -> None:
        super().__init__(dim)
        faiss = require_faiss()
        self.requested_factory = factory
        self.fp16 = fp16
        ngpu = faiss_num_gpus()
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {device!r}")
        if device == "cuda" and ngpu == 0:
            raise RuntimeError("device='cuda' but faiss sees no GPU (install faiss-gpu: umarvel-ray[gpu])")
        self.use_gpu = device != "cpu" and ngpu > 0
        self.shard = shard
        # On GPU, fp16 flat storage is the GPU cloner's useFloat16 (GPU has no flat SQfp16 index).
        gpu_fp16_flat = self.use_gpu and fp16 and factory.replace(" ", "") == "Flat"
        self.factory = "Flat" if gpu_fp16_flat else resolve_factory(factory, fp16)
        base = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        self._wrap(faiss.IndexIDMap2(base), base)
        self.id_scheme: str | None = None
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._apply_params(self._base)

    def _wrap(self, idmap: Any, base: Any) -> None:
        self._idmap, self._base = idmap, base  # keep both Python refs alive (base owned by idmap)
        self._gpu: Any = None

    # -- build ----------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return bool(self._base.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Train IVF/PQ codebooks on a sample (no-op for Flat/HNSW)."""
        if self.is_trained:
            return
        x = np.ascontiguousarray(sample, dtype=np.float32)
        require_finite(x, "training")
        need = min_train_vectors(self.factory)
        if len(x) < need:  # faiss would raise a C++ error below k centroids, or warn below 39 x k
            raise ValueError(f"faiss {self.factory} needs >= {need} training vectors, got {len(x)} ({RULE})")
        log.info("training faiss %s on %d vectors", self.factory, len(x))
        self._idmap.train(x)
        self._gpu = None

    def add(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> None:
        faiss = require_faiss()
        v = self.check_vectors(ids, vectors)
        if not self.is_trained:
            raise RuntimeError(f"faiss {self.factory} must be trained before add (call train())")
        arr = idm.as_id_array(ids)
        if self.id_scheme is None:
            self.id_scheme = idm.choose_scheme(arr) if len(arr) else None
        labels = None
        if self.id_scheme == idm.MBEIR:
            labels = idm.mbeir_labels(arr)
            if labels is None:  # a non-M-BEIR id arrived: relabel everything positionally
                log.warning("non M-BEIR ids in the pool: switching the index to positional labels")
                faiss.copy_array_to_vector(np.arange(len(self), dtype=np.int64), self._idmap.id_map)
                self._idmap.construct_rev_map()
                self.id_scheme = idm.POSITIONAL
        if labels is None:
            labels = idm.make_labels(arr, idm.POSITIONAL, offset=len(self))
        self._idmap.add_with_ids(v, labels)
        self._append_ids(arr)
        self._gpu = None

    def labels(self) -> np.ndarray:
        """int64 labels stored in the IDMap2, position-aligned with `ids`."""
        return require_faiss().vector_to_array(self._idmap.id_map).astype(np.int64)

    # -- search ---------------------------------------------------------------------------
    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """nprobe (IVF) / efSearch (HNSW): recall vs speed, applied to the CPU and GPU copies."""
        if nprobe is not None:
            self.nprobe = nprobe
        if ef_search is not None:
            self.ef_search = ef_search
        self._apply_params(self._base)
        if self._gpu is not None:
            self._apply_params(self._gpu, gpu=True)

    def _apply_params(self, index: Any, gpu: bool = False) -> None:
        faiss = require_faiss()
        space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            if value is None:
                continue
            try:
                space.set_index_parameter(index, name, int(value))
            except RuntimeError as e:
                raise ValueError(f"{name} does not apply to faiss index {self.factory!r}: {e}") from e

    def _search_target(self, kk: int) -> Any:
        if not self.use_gpu or kk > GPU_MAX_K:
            return self._base
        if self._gpu is None:
            faiss = require_faiss()
            co = faiss.GpuMultipleClonerOptions()
            co.shard = self.shard
            co.useFloat16 = self.fp16
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self._base, co=co)
                self._apply_params(self._gpu, gpu=True)
            except (RuntimeError, AttributeError) as e:
                log.warning("faiss GPU clone of %s failed (%s); searching on CPU", self.factory, e)
                self.use_gpu = False
                return self._base
        return self._gpu

    def _search_block(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        scores, pos = self._search_target(kk).search(queries, kk)
        return scores, pos.astype(np.int64, copy=False)

    def vectors(self) -> np.ndarray:
        """Stored vectors (decoded from fp16 storage) for exact indexes, e.g. to move to torch."""
        if not is_exact_factory(self.factory):
            raise ValueError(f"vectors are only recoverable from exact indexes, not {self.factory!r}")
        n = len(self)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._base.reconstruct_n(0, n), dtype=np.float32)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """`<path>.faiss` (IDMap2), `<path>.ids.npy` (strings), `<path>.meta.json` (written last)."""
        faiss = require_faiss()
        p = base_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        target = artifact(p, ".faiss")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        faiss.write_index(self._idmap, str(tmp))
        os.replace(tmp, target)
        atomic_save_npy(artifact(p, ".ids.npy"), ids_for_save(self.ids))
        meta = self._meta(
            factory=self.factory,
            requested_factory=self.requested_factory,
            fp16=self.fp16,
            id_scheme=self.id_scheme or idm.POSITIONAL,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            files={"index": target.name, "ids": artifact(p, ".ids.npy").name},
        )
        atomic_write_json(artifact(p, ".meta.json"), meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str], meta: dict[str, Any], device: str = "auto") -> FaissIndex:
        """Read a saved index; checks that ids and stored labels still agree."""
        faiss = require_faiss()
        p = base_path(path)
        idmap = faiss.read_index(str(artifact(p, ".faiss")))
        if not isinstance(idmap, faiss.IndexIDMap2):
            raise ValueError(f"{p}.faiss is a {type(idmap).__name__}, expected IndexIDMap2")
        base = faiss.downcast_index(idmap.index)
        ids = np.load(artifact(p, ".ids.npy"), allow_pickle=False).astype(object)
        if len(ids) != idmap.ntotal or idmap.ntotal != meta["count"]:
            raise ValueError(f"{p}: {len(ids)} ids, {idmap.ntotal} vectors, meta count {meta['count']}")
        self = cls.__new__(cls)
        SearchIndex.__init__(self, idmap.d)
        self.requested_factory = meta.get("requested_factory", meta["factory"])
        self.factory = meta["factory"]
        self.fp16 = bool(meta.get("fp16", False))
        ngpu = faiss_num_gpus()
        if device == "cuda" and ngpu == 0:
            raise RuntimeError("device='cuda' but faiss sees no GPU (install faiss-gpu: umarvel-ray[gpu])")
        self.use_gpu = device != "cpu" and ngpu > 0
        self.shard = True
        self._wrap(idmap, base)
        self.id_scheme = meta.get("id_scheme", idm.POSITIONAL)
        self.nprobe, self.ef_search = meta.get("nprobe"), meta.get("ef_search")
        self._apply_params(base)
        self._append_ids(ids)
        labels = self.labels()
        check = np.unique(np.linspace(0, len(ids) - 1, num=min(len(ids), 1000)).astype(np.int64))
        if len(ids) and not np.array_equal(
            labels[check],
            idm.make_labels(ids[check], self.id_scheme, offset=0) if self.id_scheme == idm.MBEIR else check,
        ):
            raise ValueError(f"{p}: stored labels do not match {p.name}.ids.npy")
        return self
