"""Shared fixtures: one tiny model, one toy benchmark and one local Ray per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real Qwen2-VL checkpoint directory at toy size, built offline once per session."""
    from umarvel_ray.model.tiny import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"), seed=0)


@pytest.fixture(scope="session")
def toy_mbeir_dir(tmp_path_factory):
    """The small toy M-BEIR benchmark, generated once per session (read-only for tests)."""
    from umarvel_ray.data.toy.builder import make_toy_mbeir

    return make_toy_mbeir(tmp_path_factory.mktemp("toy_mbeir"), size="small", seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process Ray on loopback for the whole session; shut down only if we started it."""
    import ray

    from umarvel_ray.runtime import ensure_ray

    started = ensure_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
