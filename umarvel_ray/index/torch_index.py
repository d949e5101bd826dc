"""Exact inner-product search with torch matmul + topk, for GPU machines without faiss-gpu.

Vectors are kept in chunks of `chunk_rows` on the target device, so one query block only ever
materialises a [block, chunk_rows] score matrix; per-chunk top-kk results are merged as the scan
goes. fp16/bf16 storage halves memory; scores are accumulated and returned in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umarvel_ray.index.base import (
    SearchIndex,
    artifact,
    atomic_save_npy,
    base_path,
    ids_for_save,
)
from umarvel_ray.io import atomic_write_json

log = logging.getLogger("umarvel_ray")

DTYPES = ("float32", "float16", "bfloat16")


def _torch() -> Any:
    import torch

    return torch


def resolve_device(device: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu."""
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA GPU")
    return device


class TorchExactIndex(SearchIndex):
    """Brute-force exact search (matches faiss Flat up to float rounding and tie order rules)."""

    backend = "torch"

    def __init__(
        self, dim: int, dtype: str = "float32", device: str = "auto", chunk_rows: int = 131072
    ) -> None:
        super().__init__(dim)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if chunk_rows <= 0:
            raise ValueError("chunk_rows must be > 0")
        torch = _torch()
        self.dtype = dtype
        self.device = resolve_device(device)
        self.chunk_rows = int(chunk_rows)
        self._torch_dtype = getattr(torch, dtype)
        self._chunks: list[Any] = []

    @property
    def factory(self) -> str:
        return "Flat"

    def add(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> None:
        torch = _torch()
        v = self.check_vectors(ids, vectors)
        self._append_ids(ids)
        start = 0
        # Top up the last chunk first so chunks stay full-sized whatever the add batch size.
        if self._chunks and len(self._chunks[-1]) < self.chunk_rows and len(v):
            room = self.chunk_rows - len(self._chunks[-1])
            extra = torch.from_numpy(v[:room]).to(self.device, self._torch_dtype, copy=True)
            self._chunks[-1] = torch.cat([self._chunks[-1], extra])
            start = room
        for s in range(start, len(v), self.chunk_rows):
            # copy=True: never alias the caller's array (from_numpy + same-device .to would).
            block = torch.from_numpy(v[s : s + self.chunk_rows])
            self._chunks.append(block.to(self.device, self._torch_dtype, copy=True))

    def _search_block(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        with torch.no_grad():
            q = torch.from_numpy(queries).to(self.device, self._torch_dtype)
            best_s = best_p = None
            offset = 0
            for chunk in self._chunks:
                s = (q @ chunk.T).float()
                cs, cp = torch.topk(s, min(kk, s.shape[1]), dim=1)
                cp = cp + offset
                offset += chunk.shape[0]
                if best_s is None:
                    best_s, best_p = cs, cp
                else:
                    s2, p2 = torch.cat([best_s, cs], 1), torch.cat([best_p, cp], 1)
                    best_s, sel = torch.topk(s2, min(kk, s2.shape[1]), dim=1)
                    best_p = torch.gather(p2, 1, sel)
            assert best_s is not None and best_p is not None
            return best_s.cpu().numpy().astype(np.float32), best_p.cpu().numpy().astype(np.int64)

    def vectors(self) -> np.ndarray:
        """Stored vectors as float32 numpy (after the storage dtype's rounding)."""
        torch = _torch()
        if not self._chunks:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(self._chunks).float().cpu().numpy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """`<path>.vectors.npy` (float16 for fp16, else float32), `<path>.ids.npy`, `<path>.meta.json`."""
        p = base_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        vecs = self.vectors()
        atomic_save_npy(
            artifact(p, ".vectors.npy"), vecs.astype(np.float16) if self.dtype == "float16" else vecs
        )
        atomic_save_npy(artifact(p, ".ids.npy"), ids_for_save(self.ids))
        meta = self._meta(
            factory="Flat",
            dtype=self.dtype,
            id_scheme="positional",
            files={"vectors": artifact(p, ".vectors.npy").name, "ids": artifact(p, ".ids.npy").name},
        )
        atomic_write_json(artifact(p, ".meta.json"), meta)
        return p

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        meta: dict[str, Any],
        device: str = "auto",
        dtype: str | None = None,
    ) -> TorchExactIndex:
        p = base_path(path)
        vecs = np.load(artifact(p, ".vectors.npy"), allow_pickle=False)
        ids = np.load(artifact(p, ".ids.npy"), allow_pickle=False).astype(object)
        if len(ids) != len(vecs) or len(ids) != meta["count"]:
            raise ValueError(f"{p}: {len(ids)} ids, {len(vecs)} vectors, meta count {meta['count']}")
        index = cls(int(meta["dim"]), dtype=dtype or meta.get("dtype", "float32"), device=device)
        index.add(ids, vecs.astype(np.float32))
        return index
