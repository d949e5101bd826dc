"""Shared setup of the Serve tests: a small pool embedded and indexed with the library, an app on
the session's local Ray bound to 127.0.0.1, shut down in a finally."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

POOL_FILE = "cand_pool/local/mbeir_webqa_task2_cand_pool.jsonl"
POOL_ROWS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_pool(out: Path, model_dir: Path, data_root: Path) -> dict[str, Any]:
    """Subset pool jsonl + embedding shard + manifest + saved index, all written by the library."""
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.mbeir import read_pool
    from umarvel_ray.data.model_items import candidate_item
    from umarvel_ray.index import build_index
    from umarvel_ray.model.embedder import Embedder
    from umarvel_ray.store import shard_name, write_manifest, write_shard

    out.mkdir(parents=True, exist_ok=True)
    lines = (data_root / POOL_FILE).read_text().splitlines()[:POOL_ROWS]
    pool = out / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n")
    rows = read_pool(pool).to_pylist()
    emb = Embedder.load(model_dir)
    px = (emb.cfg.inputs.min_pixels, emb.cfg.inputs.max_pixels)
    items = []
    for r in rows:
        it = candidate_item(r)
        if it["image"]:
            it["image"] = load_image(data_root, it["image"], min_pixels=px[0], max_pixels=px[1])
        items.append(it)
    vecs = emb.encode_candidates(items)
    ids = [r["did"] for r in rows]
    emb_dir = out / "embeddings"
    write_shard(emb_dir / shard_name(0), ids, [r["modality"] for r in rows], vecs)
    write_manifest(
        emb_dir,
        {  # the shape embed/run.py writes: what the job ran with sits under "settings"
            "input": str(pool),
            "dim": int(vecs.shape[1]),
            "settings": {"input": str(pool), "data_root": str(data_root), "text_rule": "uniir"},
            "complete": True,
        },
    )
    index_dir = out / "index"
    index_dir.mkdir()
    build_index(vecs, ids).save(index_dir / "pool")
    return {"pool": pool, "rows": rows, "items": items, "vectors": vecs, "ids": ids,
            "embeddings_dir": emb_dir, "index_dir": index_dir, "embedder": emb, "pixels": px}


def small_args(model_dir: Path, setup: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Builder args for 2 shared cores: fractional CPUs, one replica each, small queues."""
    args: dict[str, Any] = {
        "model_dir": str(model_dir),
        "reranker_dir": str(model_dir),
        "index_dir": str(setup["index_dir"]),
        "embeddings_dir": str(setup["embeddings_dir"]),
        "embedder.num_cpus": 0.25,
        "reranker.num_cpus": 0.25,
        "retriever.num_cpus": 0.1,
        "embedder.torch_threads": 1,
        "reranker.torch_threads": 1,
        "embedder.max_batch_size": 8,
        "reranker.max_batch_size": 8,
        "embedder.max_ongoing_requests": 16,
        "reranker.max_ongoing_requests": 16,
        "limits.max_image_bytes": 200_000,
        "limits.max_body_bytes": 400_000,
        "limits.max_image_pixels": 1_000_000,
    }
    args.update(extra)
    return args


def wait_ready(base: str, timeout_s: float = 120.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{base}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = r.status_code
        except requests.RequestException as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"app at {base} not ready after {timeout_s}s (last: {last})")


@contextlib.contextmanager
def serve_app(args: dict[str, Any], name: str = "umarvel_test", route_prefix: str = "/"):
    """Deploy the app on the session's Ray over HTTP on 127.0.0.1; delete it and stop Serve after.
    Yields the app's base URL (with the route prefix, no trailing slash)."""
    from ray import serve

    from umarvel_ray.serve.app import build, serve_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(serve_config(args)), name=name, route_prefix=route_prefix, blocking=False)
        base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
        wait_ready(base)
        yield base
    finally:
        with contextlib.suppress(Exception):
            serve.delete(name)
        serve.shutdown()


def png_b64(arr: np.ndarray) -> str:
    import base64

    from umarvel_ray.data.images import encode_png

    return base64.b64encode(encode_png(arr)).decode()


def dumps(obj: Any) -> str:
    return json.dumps(obj)
