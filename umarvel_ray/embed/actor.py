"""The model stage of the embedding pipeline: `EmbedActor`, one embedder load per Ray actor.

It receives the groups `decode.decode_chunks` made (one model batch each), runs the forward pass
and returns the rows' meta columns plus a float32 vector per row; rows rejected upstream, rows
the model fails on alone, and rows whose vector is not finite travel on as rejects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from umarvel_ray.embed import decode
from umarvel_ray.embed.commit import RESULT_COLUMNS


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


__all__ = ["EmbedActor", "reject_non_finite"]
