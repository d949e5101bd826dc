"""Ray Serve app over real HTTP on 127.0.0.1: embed/rerank/search equal the library, bad input
gets its status without harming the replicas."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import numpy as np
import pytest
from serve_fixtures import build_pool, png_b64, serve_app, small_args

from umarvel_ray.data.model_items import normalize_text

pytestmark = [pytest.mark.ray, pytest.mark.slow]
requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, toy_mbeir_dir):
    return build_pool(tmp_path_factory.mktemp("serve_pool"), tiny_model_dir, toy_mbeir_dir)


@pytest.fixture(scope="module")
def base(ray_cluster, setup, tiny_model_dir):
    with serve_app(small_args(tiny_model_dir, setup)) as url:
        yield url


@pytest.fixture(scope="module")
def reranker(tiny_model_dir):
    from umarvel_ray.model.reranker import Reranker

    return Reranker.load(tiny_model_dir)


def _img(seed: int, h: int = 60, w: int = 90) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _decoded(arr: np.ndarray, px: tuple[int, int]) -> np.ndarray:
    from umarvel_ray.data.images import decode_image, encode_png

    return decode_image(encode_png(arr), min_pixels=px[0], max_pixels=px[1])


def _post(base: str, path: str, body, **kw):
    return requests.post(f"{base}{path}", json=body, timeout=60, **kw)


def test_embed_equals_library(base, setup):
    emb, px = setup["embedder"], setup["pixels"]
    queries = [
        {"text": "A red circle on the left.", "instruction": "Retrieve an image that matches the caption."},
        {"image": png_b64(_img(1))},
        {"text": "Make it blue.", "image": "data:image/png;base64," + png_b64(_img(2, 84, 84)),
         "instruction": "Find the edited image."},
    ]
    local_q = [
        {"text": queries[0]["text"], "image": None, "instruction": queries[0]["instruction"]},
        {"text": None, "image": _decoded(_img(1), px), "instruction": None},
        {"text": "Make it blue.", "image": _decoded(_img(2, 84, 84), px), "instruction": "Find the edited image."},
    ]
    want_q = emb.encode_queries(local_q)
    r = _post(base, "/v1/embed", {"items": queries, "role": "query"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, want_q, atol=1e-4)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["dim"] == want_q.shape[1] and body["usage"]["items"] == 3 and body["usage"]["images"] == 2
    assert body["usage"]["prompt_tokens"] > 0
    assert r.headers["X-Request-ID"]

    r = _post(base, "/v1/embed", {"items": [{"text": "A blue square."}], "role": "candidate",
                                  "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    want_c = emb.encode_candidates([{"text": "A blue square.", "image": None, "instruction": None}])[0]
    np.testing.assert_allclose(vec, want_c, atol=1e-4)

    raw = _post(base, "/v1/embed", {"items": [{"text": "A blue square."}], "role": "candidate",
                                    "normalize": False}).json()["data"][0]["embedding"]
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(np.asarray(raw) / np.linalg.norm(raw), want_c, atol=1e-4)


def test_openai_embeddings_shape(base, setup):
    emb = setup["embedder"]
    texts = ["first sentence", "second one"]
    want = emb.encode_queries([{"text": normalize_text(t)} for t in texts])
    r = _post(base, "/v1/embeddings", {"input": texts, "model": "umarvel"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, atol=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    b64 = _post(base, "/v1/embeddings", {"input": texts[1], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), want[1], atol=1e-4)


def test_indexed_candidate_is_its_own_nearest_neighbour(base, setup, toy_mbeir_dir):
    from umarvel_ray.data.model_items import apply_text_rule

    vecs, ids = setup["vectors"], setup["ids"]
    for j in (0, 7, 19, 33):
        row = setup["rows"][j]
        query = {}
        if row["txt"]:
            query["text"] = apply_text_rule(row["txt"])  # the rule the pool was embedded with
        if row["img_path"]:
            query["image"] = base64.b64encode((toy_mbeir_dir / row["img_path"]).read_bytes()).decode()
        r = _post(base, "/v1/search", {"query": query, "query_role": "candidate", "k": 3})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        same = {ids[i] for i in range(len(ids)) if np.abs(vecs[i] - vecs[j]).max() < 1e-5}
        assert top["id"] in same, (top, row["did"])
        assert top["retrieval_score"] == pytest.approx(1.0, abs=1e-4)
        assert top["rank"] == 1 and top["record"]["id"] == top["id"]


def test_search_matches_index_and_timings(base, setup):
    from umarvel_ray.index import load_index

    emb = setup["embedder"]
    q = {"text": "Where is the purple triangle?", "instruction": "Retrieve a passage that answers the question."}
    qv = emb.encode_queries([{**q, "image": None}])
    index = load_index(setup["index_dir"] / "pool")
    scores, ids = index.search(qv, 5)
    body = _post(base, "/v1/search", {"query": q, "k": 5}).json()
    assert [r["id"] for r in body["results"]] == ids[0]
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores[0], atol=1e-4)
    assert set(body["timings_ms"]) == {"decode", "embed", "search"}
    assert "record" not in _post(base, "/v1/search", {"query": q, "k": 2, "return_records": False}).json()["results"][0]


def test_rerank_order_equals_library(base, setup, reranker):
    pool_ids = setup["ids"][:3]
    docs_api = ["A purple triangle.", {"text": "Two small circles.", "image": png_b64(_img(5))},
                *({"id": i} for i in pool_ids), {"image": png_b64(_img(6, 56, 112))}]
    px = (reranker.cfg.inputs.min_pixels, reranker.cfg.inputs.max_pixels)
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.model_items import candidate_item

    pool_items = [candidate_item(next(r for r in setup["rows"] if r["did"] == i)) for i in pool_ids]
    docs_local = [
        {"text": "A purple triangle.", "image": None},
        {"text": "Two small circles.", "image": _decoded(_img(5), px)},
        *pool_items,
        {"text": None, "image": _decoded(_img(6, 56, 112), px)},
    ]
    for it in docs_local:
        if isinstance(it.get("image"), str):
            it["image"] = load_image(_data_root(setup), it["image"], min_pixels=px[0], max_pixels=px[1])
    query = {"text": "Is there a triangle?", "instruction": "Judge the candidate."}
    want = reranker.score([({**query, "image": None}, d) for d in docs_local])
    r = _post(base, "/v1/rerank", {"query": query, "documents": docs_api, "return_documents": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == sorted(range(len(want)), key=lambda i: (-want[i], i))
    np.testing.assert_allclose([x["relevance_score"] for x in res], np.sort(want)[::-1], atol=1e-4)
    assert res[0]["document"]
    top2 = _post(base, "/v1/rerank", {"query": "Is there a triangle?", "documents": ["a", "b", "c"], "top_n": 2})
    assert len(top2.json()["results"]) == 2


def _data_root(setup):
    import json

    return json.loads((setup["embeddings_dir"] / "manifest.json").read_text())["settings"]["data_root"]


def test_search_rerank_fusion(base, setup, reranker):
    from umarvel_ray.data.images import load_image
    from umarvel_ray.data.model_items import candidate_item

    q = {"text": "A purple triangle on the left.", "instruction": "Retrieve an image."}
    w = 0.7
    body = _post(base, "/v1/search", {"query": q, "k": 4, "rerank": True, "rerank_top_n": 6,
                                      "fusion_weight": w}).json()
    res = body["results"]
    assert len(res) == 4 and set(body["timings_ms"]) == {"decode", "embed", "search", "rerank"}
    px = (reranker.cfg.inputs.min_pixels, reranker.cfg.inputs.max_pixels)
    for r in res:
        assert r["score"] == pytest.approx(r["retrieval_score"] + w * r["rerank_score"], abs=1e-6)
        it = candidate_item(next(x for x in setup["rows"] if x["did"] == r["id"]))
        if it["image"]:
            it["image"] = load_image(_data_root(setup), it["image"], min_pixels=px[0], max_pixels=px[1])
        p = reranker.score([({**q, "image": None}, it)])[0]
        assert r["rerank_score"] == pytest.approx(float(p), abs=1e-4)
    fused = [r["score"] for r in res]
    assert fused == sorted(fused, reverse=True)
    # the reranked head is the retrieval top-6 reordered: its best fused score is the best of those 6
    plain = _post(base, "/v1/search", {"query": q, "k": 6}).json()["results"]
    assert {r["id"] for r in res} <= {r["id"] for r in plain}


BAD = [
    ("/v1/embed", {"items": [{"text": "x"}], "bogus": 1}, 422, "bogus"),
    ("/v1/embed", {"items": [{"text": "x", "colour": "red"}]}, 422, "colour"),
    ("/v1/embed", {"items": []}, 422, "items"),
    ("/v1/embed", {"items": [{"text": "x"}] * 65}, 422, "items"),
    ("/v1/embed", {"items": [{}]}, 422, "text or image"),
    ("/v1/embed", {"items": [{"text": 5}]}, 422, "items.0.text"),
    ("/v1/embed", {"items": [{"text": "x" * 9000}]}, 422, "items[0].text"),
    ("/v1/embed", {"items": [{"image": "not base64!!"}]}, 400, "base64"),
    ("/v1/embed", {"items": [{"image": base64.b64encode(b"hello, not an image").decode()}]}, 400, "not an image"),
    ("/v1/embed", {"items": [{"image": "https://example.com/cat.png"}]}, 400, "URLs"),
    ("/v1/embed", {"items": [{"image": "/etc/passwd"}]}, 400, "base64"),
    ("/v1/embed", {"items": [{"image": "data:image/gif;base64,R0lGOD=="}]}, 400, "image/gif"),
    ("/v1/embed", {"items": [{"text": "ok"}], "role": "judge"}, 422, "role"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ("/v1/embeddings", {"input": []}, 422, "input"),
    ("/v1/search", {"query": {"text": "x"}, "k": 0}, 422, "k"),
    ("/v1/search", {"query": {"text": "x"}, "k": 101}, 422, "k"),
    ("/v1/search", {"query": {"text": "x"}, "rerank": True, "rerank_top_n": 1000}, 422, "rerank_top_n"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "documents"),
    ("/v1/rerank", {"query": "q", "documents": [{"id": "999:999"}]}, 404, "999:999"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 5}, 422, "top_n"),
]


def _gif() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="GIF")
    return base64.b64encode(buf.getvalue()).decode()


def _png(h: int, w: int) -> str:
    return png_b64(np.zeros((h, w, 3), np.uint8))


BAD_IMAGES = [
    (lambda: _gif(), 400, "GIF"),
    (lambda: _png(4, 40), 400, "minimum side"),
    (lambda: _png(1100, 1000), 413, "pixel cap"),
    (lambda: base64.b64encode(b"\x89PNG" + b"\x00" * 300_000).decode(), 413, "bytes"),
    (lambda: base64.b64encode((np.zeros(10, np.uint8)).tobytes() + b"\x89PNG\r\n\x1a\n").decode(), 400, "not an image"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_status(base, path, body, status, needle):
    r = _post(base, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err["param"], err
    assert r.headers["X-Request-ID"]


@pytest.mark.parametrize("make,status,needle", BAD_IMAGES, ids=["gif", "small", "pixels", "bytes", "garbage"])
def test_bad_image_status(base, make, status, needle):
    r = _post(base, "/v1/embed", {"items": [{"text": "ok", "image": make()}]})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_body_cap_and_records(base, setup):
    r = requests.post(f"{base}/v1/embed", data=b"{" + b" " * 500_000 + b"}", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = requests.post(f"{base}/v1/embed", data=b"{not json", timeout=30)
    assert r.status_code == 422
    rid = next(r["did"] for r in setup["rows"] if r["img_path"])
    rec = requests.get(f"{base}/v1/records/{rid}", timeout=10).json()
    assert rec["id"] == rid and rec["image_url"] == f"/v1/records/{rid}/image"
    img = requests.get(f"{base}{rec['image_url']}", timeout=10)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (_data_root_path(setup) / next(r["img_path"] for r in setup["rows"] if r["did"] == rid)).read_bytes()
    assert requests.get(f"{base}/v1/records/nope:1", timeout=10).status_code == 404
    assert requests.get(f"{base}/v1/records/..%2F..%2Fetc/image", timeout=10).status_code == 404
    assert requests.get(f"{base}/no/such/route", timeout=10).status_code == 404
    models = requests.get(f"{base}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "umarvel"
    rid_echo = _post(base, "/v1/search", {"query": {"text": "x"}, "k": 1}, headers={"X-Request-ID": "abc123"})
    assert rid_echo.headers["X-Request-ID"] == "abc123" and rid_echo.json()["id"] == "abc123"
    err = _post(base, "/v1/search", {"query": {"text": "x"}, "k": 0}, headers={"X-Request-ID": "e-1"})
    assert err.status_code == 422 and err.headers["X-Request-ID"] == "e-1"


def _data_root_path(setup):
    from pathlib import Path

    return Path(_data_root(setup))


def test_burst_of_bad_requests_leaves_app_healthy(base, setup):
    bad = [BAD[i % len(BAD)] for i in range(200)]

    def send(case):
        path, body, status, _ = case
        return _post(base, path, body).status_code == status

    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(send, bad))
    emb = setup["embedder"]
    for text in ("still alive", "another query"):
        r = _post(base, "/v1/embed", {"items": [{"text": text}]})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], emb.encode_queries([{"text": normalize_text(text)}])[0], atol=1e-4)
    assert _post(base, "/v1/search", {"query": {"text": "x"}, "k": 2}).status_code == 200


def test_openai_client(base, setup):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    texts = ["a purple triangle", "two striped circles"]
    want = setup["embedder"].encode_queries([{"text": normalize_text(t)} for t in texts])
    default = client.embeddings.create(model="umarvel", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="umarvel", input=texts, encoding_format="float")
    for resp in (default, as_float):
        np.testing.assert_allclose(np.array([d.embedding for d in resp.data]), want, atol=1e-4)
        assert resp.usage.prompt_tokens > 0
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        client.embeddings.create(model="umarvel", input="x", dimensions=8)


def test_cohere_client(base, reranker):
    cohere = pytest.importorskip("cohere")
    docs = ["A purple triangle.", "Two small circles.", "A green square on the right."]
    query = "Is there a triangle?"
    want = reranker.score([({"text": query}, {"text": d}) for d in docs])
    order = sorted(range(len(docs)), key=lambda i: (-want[i], i))
    for client in (cohere.ClientV2(api_key="unused", base_url=base), cohere.Client(api_key="unused", base_url=base)):
        resp = client.rerank(model="umarvel", query=query, documents=docs, top_n=2)
        assert [r.index for r in resp.results] == order[:2]
        np.testing.assert_allclose([r.relevance_score for r in resp.results], [want[i] for i in order[:2]], atol=1e-4)
