"""The re-ranker actor of the pair-scoring job, its pixel budget and its GPU placement."""

from __future__ import annotations

from typing import Any

import numpy as np

from umarvel_ray.config import ConfigError
from umarvel_ray.rerank.pairs import image_from_bytes


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


class RerankActor:
    """Ray Data actor: one `Reranker.load` per actor, P(Yes) for each valid pair of a batch.

    Rejected pairs pass through with NaN. If a batch fails, its pairs are scored one at a time and
    only the failing ones are rejected; if every pair fails alone the error is systemic and raised.
    Output columns: group, qid, rank (passed through), p_yes (float32), reject (str, "" = scored).
    """

    def __init__(
        self,
        reranker: str,
        adapter: str | None = None,
        overrides: dict[str, Any] | None = None,
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
        self.reranker = Reranker.load(reranker, adapter=adapter, cfg_overrides=overrides or None)
        if use_gpu and torch.cuda.is_available():
            self.reranker.to("cuda")
        self.reranker.eval()
        self.batch_size = batch_size

    @staticmethod
    def _pairs(batch: dict[str, np.ndarray], rows: np.ndarray) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The (query, candidate) items of `rows`. A column that is None in every row of a block
        (e.g. the texts of image-only candidates) reaches the actor through Arrow as float NaN, so
        anything that is not a str (bytes for images) is read as None, never as the text "nan"."""
        return [
            (
                {
                    "text": _str(batch["q_text"][i]),
                    "image": image_from_bytes(_bytes(batch["q_image"][i]), batch["q_h"][i], batch["q_w"][i]),
                    "instruction": _str(batch["q_instruction"][i]),
                },
                {
                    "text": _str(batch["c_text"][i]),
                    "image": image_from_bytes(_bytes(batch["c_image"][i]), batch["c_h"][i], batch["c_w"][i]),
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
            "group": batch["group"],
            "qid": batch["qid"],
            "rank": batch["rank"],
            "p_yes": p_yes,
            "reject": reject,
        }


def reranker_pixels(path: str, adapter: str | None, overrides: dict[str, Any] | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the re-ranker's saved config, without loading weights."""
    from umarvel_ray.model.reranker import saved_reranker_config
    from umarvel_ray.model.saved import saved_pixel_budget

    return saved_pixel_budget(saved_reranker_config(path, adapter, overrides))


def use_gpu(mode: str) -> bool:
    """Whether the actors take a GPU: `mode` auto (if the cluster has one), true (ConfigError
    without one) or false. Needs a running Ray."""
    from umarvel_ray.runtime import cluster_gpus

    if mode == "false":
        return False
    gpus = cluster_gpus()
    if mode == "true" and gpus < 1:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPU")
    return gpus >= 1


__all__ = ["RerankActor", "reranker_pixels", "use_gpu"]
