"""`BenchSettings`: one run of `jobs/bench_serve.py` (the load points, the deployments' resources,
the autoscaling phase), read by the bench driver, its load generator and its report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BenchSettings:
    """One bench run; `quick()` and `full()` are the two presets the job offers."""

    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    requests_per_point: int = 3000
    seconds_per_point: float = 12.0
    warmup_requests: int = 64
    request_timeout_s: float = 30.0
    pool_rows: int = 200
    image_size: tuple[int, int] | None = (500, 375)  # query images as realistic JPEGs; None = toy PNGs
    batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    embedder_cpus: float = 0.5
    retriever_cpus: float = 0.25
    torch_threads: int = 1
    ray_cpus: int = 2
    object_store_mb: int = 200
    autoscale: bool = True
    autoscale_concurrency: int = 16
    autoscale_max_replicas: int = 2
    target_ongoing_requests: float = 0.5
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 15.0
    look_back_period_s: float = 3.0
    metrics_interval_s: float = 0.5
    upscale_timeout_s: float = 60.0
    hold_s: float = 8.0
    downscale_timeout_s: float = 60.0
    poll_s: float = 0.5
    seed: int = 0

    @classmethod
    def full(cls) -> BenchSettings:
        return cls()

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            concurrencies=(2, 16),
            requests_per_point=400,
            seconds_per_point=1.5,
            warmup_requests=16,
            pool_rows=48,
            autoscale_concurrency=16,
            upscale_delay_s=1.0,
            downscale_delay_s=2.0,
            look_back_period_s=1.5,
            metrics_interval_s=0.25,
            upscale_timeout_s=30.0,  # a new replica imports torch: ~8 s idle, 20 s+ on a busy machine
            hold_s=1.0,
            downscale_timeout_s=20.0,
            poll_s=0.25,
        )

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("concurrencies must be positive")
        if self.requests_per_point < 1 or self.seconds_per_point <= 0:
            raise ValueError("every load point needs a positive request count and time bound")
        if self.batch_size < 2:
            raise ValueError("the batched arm needs batch_size >= 2 (the unbatched arm uses 1)")
