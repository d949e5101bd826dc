"""Serving settings: what to load, per-deployment scaling/batching, and the ingress's input limits.

One dataclass tree so `serve run ... key=value`, `serve deploy` YAML args and the bench all speak
the same keys; every path field carries its kind so `load_config` makes it absolute once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from umarvel_ray.config import ConfigError, option
from umarvel_ray.index.options import index_shards_option, shard_cpus_option


@dataclass
class DeploymentSettings:
    """Replicas, queueing and dynamic batching of one deployment (Ray Serve options)."""

    min_replicas: int = option(1, "autoscaling: fewest replicas")
    max_replicas: int = option(1, "autoscaling: most replicas")
    initial_replicas: int | None = option(None, "autoscaling: replicas at deploy time (null = min)")
    target_ongoing_requests: float = option(2.0, "autoscaling: ongoing requests per replica to aim for")
    upscale_delay_s: float = option(30.0, "autoscaling: load must persist this long before adding")
    downscale_delay_s: float = option(600.0, "autoscaling: idle must persist this long before removing")
    look_back_period_s: float = option(30.0, "autoscaling: window of averaged metrics")
    metrics_interval_s: float | None = option(
        None,
        "autoscaling: how often callers report load to the controller (Ray 2.60 still reads this "
        "deprecated field; null = Serve's 10 s). Keep look_back_period_s above it",
    )
    max_ongoing_requests: int = option(32, "requests one replica works on at once (>= batch size)")
    max_queued_requests: int = option(64, "requests waiting per caller before 503/429 (never -1: bursts)")
    num_cpus: float = option(
        0.5,
        "CPUs reserved per replica; the defaults (0.5 + 0.5 + 0.25 for the ingress) let the whole app "
        "start on a 2-core laptop; raise it on CPU-only servers (GPU replicas are gated by their GPU)",
    )
    use_gpu: str = option("auto", "auto (one GPU per replica when the cluster has GPUs) | true | false")
    max_batch_size: int = option(16, "@serve.batch: most items per forward (1 = batching off)")
    batch_wait_timeout_s: float = option(0.01, "@serve.batch: longest wait to fill a batch")
    torch_threads: int = option(0, "torch intra-op threads per replica; 0 = max(1, int(num_cpus))")

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError("max_ongoing_requests must be >= max_batch_size (else batches never fill)")
        if self.max_queued_requests < 1:
            raise ConfigError("max_queued_requests must be >= 1 (an unbounded queue hangs under bursts)")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"use_gpu must be auto|true|false, got {self.use_gpu!r}")
        if self.metrics_interval_s is not None and not 0 < self.metrics_interval_s < self.look_back_period_s:
            raise ConfigError("metrics_interval_s must be > 0 and below look_back_period_s")

    def autoscaling_config(self) -> dict[str, float | int]:
        cfg: dict[str, float | int] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            cfg["initial_replicas"] = self.initial_replicas
        if self.metrics_interval_s is not None:
            cfg["metrics_interval_s"] = self.metrics_interval_s
        return cfg


@dataclass
class Limits:
    """Input limits the ingress checks before anything enters a batch."""

    max_body_bytes: int = option(8 * 1024 * 1024, "request body cap (the Serve proxy has none)")
    max_image_bytes: int = option(4 * 1024 * 1024, "decoded base64 bytes of one image")
    max_image_pixels: int = option(16_000_000, "source pixels of one image (checked from the header)")
    min_image_side: int = option(8, "shortest accepted image side in pixels")
    max_items: int = option(64, "items per /v1/embed or /v1/embeddings call")
    max_documents: int = option(100, "documents per /v1/rerank call")
    max_k: int = option(100, "largest k of /v1/search")
    max_rerank_top_n: int = option(100, "largest rerank_top_n of /v1/search")
    max_text_chars: int = option(8192, "characters of one text or instruction")


@dataclass
class ServeConfig:
    """The served app: model, index, pool records and per-deployment settings."""

    model_dir: str = option("", "embedder model directory (merged checkpoint)", path="model")
    reranker_dir: str = option("", "reranker model directory; empty = no rerank routes", path="model")
    reranker_judge: str | None = option(
        None, "override the reranker's judge (true_false = MM-Embed's zero-shot prompt on an untrained MLLM)"
    )
    index_dir: str = option("", "saved index base path, or a directory holding exactly one index", path="cwd")
    embeddings_dir: str = option(
        "", "embedding shards of the pool (its manifest names pool, data_root, text rule)", path="cwd"
    )
    pool: str = option("", "candidate pool jsonl (default: the embeddings manifest's input)", path="data")
    data_root: str = option("", "root of the pool's img_path (default: the manifest's)", path="cwd")
    text_rule: str | None = option(None, "uniir | none (default: the manifest's, else uniir)")
    index_shards: int = index_shards_option()
    index_shard_cpus: float = shard_cpus_option(0.25)  # fits the 2-core laptop like the replicas
    model_name: str = option("umarvel", "the name /v1/models and responses report")
    api_key: str | None = option(None, "bearer token required on every route but /healthz (null = open)")
    fusion_weight: float = option(1.0, "U-MARVEL+ rerank fusion: score = cos + w * P(Yes)")
    retry_after_s: int = option(1, "Retry-After seconds sent with 429/503")
    route_prefix: str = option("/", "HTTP route prefix of the app")
    limits: Limits = field(default_factory=Limits)
    embedder: DeploymentSettings = field(default_factory=DeploymentSettings)
    reranker: DeploymentSettings = field(default_factory=DeploymentSettings)
    retriever: DeploymentSettings = field(
        default_factory=lambda: DeploymentSettings(
            max_ongoing_requests=64, max_queued_requests=128, max_batch_size=1, num_cpus=0.25
        )
    )
