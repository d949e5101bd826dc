"""The model deployments: Embedder and Reranker replicas with dynamic batching (`@serve.batch`).

Items arrive already validated and decoded by the ingress (one exception fails a whole batch), so
a batch method only groups, collates and runs one forward. Batch size and wait come from config
through `set_max_batch_size` / `set_batch_wait_timeout_s` at construction (1 = batching off).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - ray[serve] is a core dependency
    raise ImportError("serving needs Ray Serve: pip install 'ray[serve]==2.60.0'") from e

HEALTH_ITEM = {"text": "health check", "image": None, "instruction": None}


def _setup_torch(settings: dict[str, Any]) -> str:
    """Threads per replica and the device: a GPU when Serve gave this replica one."""
    from umarvel_ray.progress import quiet_known_noise

    quiet_known_noise()
    import torch

    threads = int(settings.get("torch_threads") or 0) or max(1, int(settings.get("num_cpus", 1)))
    torch.set_num_threads(threads)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _configure_batching(method: Any, settings: dict[str, Any]) -> None:
    method.set_max_batch_size(int(settings["max_batch_size"]))
    method.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))


@serve.deployment(name="Embedder")
class EmbedderServer:
    """One embedder per replica; `embed` batches (role, item) requests across callers."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        from umarvel_ray.model.embedder import Embedder

        device = _setup_torch(settings)
        self.model = Embedder.load(model_dir).to(device)
        _configure_batching(self.embed, settings)
        self.batches: list[int] = []  # recent batch sizes (bench, tests)
        self.totals = {"batches": 0, "items": 0}  # since start: mean batch size over any window

    def info(self) -> dict[str, Any]:
        return {"dim": self.model.dim, "device": str(self.model.device)}

    def _forward(self, items: list[dict[str, Any]], is_query: bool) -> tuple[np.ndarray, np.ndarray]:
        """Pooled vectors before normalisation and token counts, one collated batch."""
        import torch

        batch = self.model.collate(items, is_query=is_query)
        with torch.inference_mode():
            pooled = self.model.pool(self.model.hidden_states(batch), batch)
        return pooled.float().cpu().numpy(), batch["attention_mask"].sum(1).cpu().numpy()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        self.batches = (self.batches + [len(requests)])[-1000:]
        self.totals["batches"] += 1
        self.totals["items"] += len(requests)
        out: list[dict[str, Any]] = [{} for _ in requests]
        for role in ("query", "candidate"):
            idx = [i for i, (r, _) in enumerate(requests) if r == role]
            if not idx:
                continue
            vecs, tokens = self._forward([requests[i][1] for i in idx], is_query=role == "query")
            for j, i in enumerate(idx):
                out[i] = {"vector": vecs[j], "tokens": int(tokens[j])}
        return out

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def batch_totals(self) -> dict[str, int]:
        """Batches run and items embedded since this replica started (health checks excluded)."""
        return dict(self.totals)

    def check_health(self) -> None:
        """A real forward on a one-word query: a wedged model or device fails the replica."""
        vec, _ = self._forward([HEALTH_ITEM], is_query=True)
        if not np.isfinite(vec).all():
            raise RuntimeError("embedder health check produced non-finite values")


@serve.deployment(name="Reranker")
class RerankerServer:
    """One Yes/No judge per replica; `score` batches (query, candidate) pairs across callers."""

    def __init__(self, model_dir: str, settings: dict[str, Any], judge: str | None = None):
        from umarvel_ray.model.reranker import Reranker

        device = _setup_torch(settings)
        overrides = {"judge": judge} if judge else None
        self.model = Reranker.load(model_dir, cfg_overrides=overrides).to(device)
        _configure_batching(self.score, settings)

    def info(self) -> dict[str, Any]:
        return {"judge": self.model.cfg.judge, "device": str(self.model.device)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[float]:
        return [float(p) for p in self.model.score(list(pairs), batch_size=len(pairs))]

    def check_health(self) -> None:
        p = self.model.score([(HEALTH_ITEM, HEALTH_ITEM)])
        if not np.isfinite(p).all():
            raise RuntimeError("reranker health check produced non-finite values")
