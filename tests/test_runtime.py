"""The local Ray a job starts stays on loopback."""

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
