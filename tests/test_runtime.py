"""The local Ray a job starts stays on loopback, and its workers can find their own cluster."""

import os

import pytest

pytestmark = pytest.mark.ray


def test_local_ray_binds_only_to_loopback(ray_cluster):
    addresses = {n["NodeManagerAddress"] for n in ray_cluster.nodes() if n["Alive"]}
    assert addresses == {"127.0.0.1"}


def test_actor_pool_kwargs_use_the_current_ray_data_api():
    from ray.data import ActorPoolStrategy

    from umarvel_ray.runtime import actor_pool

    kwargs = actor_pool(1, 3)
    assert isinstance(kwargs["compute"], ActorPoolStrategy)
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (1, 3)


ADDRESS_BEFORE_SESSION = os.environ.get("RAY_ADDRESS")  # read at collection, before Ray starts


def test_workers_know_their_cluster_and_the_driver_env_is_restored(ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def seen() -> tuple[str | None, str]:
        return os.environ.get("RAY_ADDRESS"), ray.get_runtime_context().gcs_address

    worker_address, gcs = ray.get(seen.remote())
    assert gcs == ray.get_runtime_context().gcs_address and gcs.startswith("127.0.0.1:")
    assert os.environ.get("RAY_ADDRESS") == ADDRESS_BEFORE_SESSION
    assert "RAY_GCS_SERVER_PORT" not in os.environ
    if ADDRESS_BEFORE_SESSION is None:  # the session started its own Ray (CI does)
        assert worker_address == gcs
