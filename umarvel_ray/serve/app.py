"""App builder: `serve run umarvel_ray.serve.app:build_app model_dir=... index_dir=...`.

Serve passes the `key=value` arguments (or a deploy YAML's `args`) as one pydantic model; they are
config overrides of `ServeConfig` (dotted keys reach nested sections, e.g. `embedder.max_batch_size=1`),
on top of an optional `config=` YAML, resolved to absolute paths once, checked against the files
on disk, and bound into Embedder + Reranker deployments behind the Retriever ingress.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from umarvel_ray.config import load_config
from umarvel_ray.serve.config import DeploymentSettings, ServeConfig


class AppArgs(BaseModel):
    """`config` (a YAML of ServeConfig keys) plus any ServeConfig key as a `key=value` override."""

    model_config = ConfigDict(extra="allow")
    config: str | None = None


def serve_config(args: AppArgs | dict[str, Any]) -> ServeConfig:
    """ServeConfig from builder args: YAML first, then every other arg as an override."""
    if isinstance(args, dict):
        args = AppArgs(**args)
    extra = dict(args.model_extra or {})
    overrides = [f"{k}={_scalar(v)}" for k, v in extra.items()]
    return load_config(ServeConfig, args.config, overrides)


def _scalar(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)


def _cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def deployment_options(s: DeploymentSettings) -> dict[str, Any]:
    """Ray Serve options of one deployment from its settings."""
    gpus = 1 if s.use_gpu == "true" or (s.use_gpu == "auto" and _cluster_has_gpus()) else 0
    return {
        "autoscaling_config": s.autoscaling_config(),
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": gpus},
    }


def build(cfg: ServeConfig) -> Any:
    """The bound application for a resolved config."""
    from dataclasses import asdict

    from umarvel_ray.serve.deployments import EmbedderServer, RerankerServer
    from umarvel_ray.serve.ingress import Retriever, ingress_options
    from umarvel_ray.serve.sources import resolve_sources

    sources = resolve_sources(cfg)
    embedder = EmbedderServer.options(**deployment_options(cfg.embedder)).bind(
        sources.model_dir, asdict(cfg.embedder)
    )
    reranker = None
    if sources.reranker_dir:
        reranker = RerankerServer.options(**deployment_options(cfg.reranker)).bind(
            sources.reranker_dir, asdict(cfg.reranker), cfg.reranker_judge
        )
    retriever_opts = deployment_options(cfg.retriever)
    retriever_opts["ray_actor_options"]["num_gpus"] = 0  # the ingress searches a CPU index
    src, options = ingress_options(sources, cfg)
    return Retriever.options(**retriever_opts).bind(embedder, reranker, src, options)


def build_app(args: AppArgs) -> Any:
    """Serve's app builder entry point."""
    return build(serve_config(args))
