"""cluster/serve_config.yaml deploys through Serve's config path (what `serve deploy` sends), with
bearer auth on and queues so small that a burst overflows: 503 + Retry-After, never a hang."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from pathlib import Path

import pytest
import yaml
from serve_fixtures import build_pool, free_port, wait_ready

pytestmark = [pytest.mark.ray, pytest.mark.slow]
requests = pytest.importorskip("requests")
CONFIG = Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml"


def test_serve_config_yaml_deploys(ray_cluster, tmp_path, tiny_model_dir, toy_mbeir_dir):
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    setup = build_pool(tmp_path / "pool", tiny_model_dir, toy_mbeir_dir)
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1"
    app = cfg["applications"][0]
    assert app["import_path"] == "umarvel_ray.serve.app:build_app"
    args = app["args"]
    assert {"model_dir", "index_dir", "embeddings_dir"} <= set(args)
    args.update(
        {
            "model_dir": str(tiny_model_dir),
            "reranker_dir": str(tiny_model_dir),
            "index_dir": str(setup["index_dir"]),
            "embeddings_dir": str(setup["embeddings_dir"]),
            "api_key": "s3cret",
            "embedder.num_cpus": 0.25,
            "reranker.num_cpus": 0.25,
            "retriever.num_cpus": 0.1,
            "embedder.max_batch_size": 1,
            "embedder.max_ongoing_requests": 1,
            "embedder.max_queued_requests": 1,
            "embedder.max_replicas": 1,
            "embedder.torch_threads": 1,
            "reranker.torch_threads": 1,
        }
    )
    port = free_port()
    cfg["http_options"]["port"] = port
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer s3cret"}
    try:
        client.deploy_apps(schema)
        wait_ready(base, timeout_s=180)
        body = {"items": [{"text": "hello"}]}
        assert requests.post(f"{base}/v1/embed", json=body, timeout=30).status_code == 401
        bad = requests.post(f"{base}/v1/embed", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{base}/v1/records/x", timeout=30).status_code == 401
        assert requests.post(f"{base}/v1/embed", json=body, headers=auth, timeout=30).status_code == 200

        burst = {"items": [{"text": f"burst item {i}"} for i in range(16)]}

        def send(_):
            r = requests.post(f"{base}/v1/embed", json=burst, headers=auth, timeout=60)
            return r.status_code, r.headers.get("Retry-After")

        with cf.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(send, range(24)))
        codes = [c for c, _ in answers]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, codes
        assert all(ra == "1" for c, ra in answers if c == 503)
        # The app still answers once the burst is over. Serve's router learns a replica's queue
        # length with a short lag, so the first request after the burst may itself get a 503: a
        # client that honours Retry-After (1 s) must get its 200 within a few tries.
        after = []
        for _ in range(5):
            r = requests.post(f"{base}/v1/embed", json=body, headers=auth, timeout=30)
            after.append(r.status_code)
            if r.status_code != 503:
                break
            time.sleep(float(r.headers["Retry-After"]))
        assert after[-1] == 200, after
    finally:
        with contextlib.suppress(Exception):
            serve.delete("umarvel")
        serve.shutdown()
