"""The `Retriever` ingress: FastAPI routes, input checks, the index and the record store.

Everything a client can get wrong is caught here (schema, base64, image format and size, counts,
unknown ids, auth) before a request reaches a model batch; the model deployments are reached
through DeploymentHandles, and a full downstream queue becomes 503 + Retry-After, never a hang.

No `from __future__ import annotations` here: FastAPI must see real `Request` annotations on the
class-based routes, or it reads `request` as a query parameter.
"""


import asyncio
import base64
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ValidationError
    from ray import serve
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - ray[serve] brings fastapi
    raise ImportError("serving needs Ray Serve with FastAPI: pip install 'ray[serve]==2.60.0'") from e

from umarvel_ray.data.model_items import apply_text_rule
from umarvel_ray.serve import schemas
from umarvel_ray.serve.config import Limits
from umarvel_ray.serve.decode import check_text, model_item
from umarvel_ray.serve.errors import ApiError, validation_error
from umarvel_ray.serve.fusion import fuse, rank_fused

log = logging.getLogger("umarvel_ray.serve")
app = FastAPI(title="umarvel-ray retrieval", docs_url=None, redoc_url=None, openapi_url=None)
REQUEST_ID = "X-Request-ID"


def _request_id(request: Request) -> str:
    """The request's id: the client's X-Request-ID or the one Serve's proxy generated.

    The proxy itself echoes it as the X-Request-ID response header on every response (errors
    included), so the ingress only reports it in bodies and never sets the header a second time.
    """
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get(REQUEST_ID, "")


def _root(request: Request) -> str:
    """The app's mount point under Serve's route prefix ("" at "/", "/umarvel" under that prefix):
    record image URLs and the page's links are built on it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _error_response(request: Request, err: ApiError, retry_after: int = 1) -> JSONResponse:
    headers = {}
    if err.status in (429, 503):
        headers["Retry-After"] = str(retry_after)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc, getattr(request.app.state, "retry_after_s", 1))


@app.exception_handler(RequestValidationError)
async def _fastapi_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(request, validation_error(exc))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(request, ApiError(exc.status_code, str(exc.detail)))


@app.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return JSONResponse(
        {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}},
        status_code=500,
    )


def _encode(vec: np.ndarray, fmt: str) -> list[float] | str:
    v = np.asarray(vec, dtype="<f4")
    return base64.b64encode(v.tobytes()).decode("ascii") if fmt == "base64" else v.tolist()


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


@serve.deployment(name="Retriever")
@serve.ingress(app)
class Retriever:
    """HTTP ingress: holds the index and records; composes Embedder and Reranker handles."""

    def __init__(self, embedder: Any, reranker: Any | None, sources: dict[str, Any], options: dict[str, Any]):
        from umarvel_ray.index import load_index
        from umarvel_ray.serve.records import RecordStore

        self.embedder = embedder
        self.reranker = reranker
        self.src = sources
        self.limits = Limits(**options["limits"])
        self.model_name = options["model_name"]
        self.api_key = options.get("api_key")
        self.fusion_weight = float(options["fusion_weight"])
        self.retry_after = int(options["retry_after_s"])
        app.state.retry_after_s = self.retry_after
        self.embed_pixels = tuple(sources["embed_pixels"])
        self.rerank_pixels = tuple(sources["rerank_pixels"])
        self.index: Any = None
        if options.get("index_shards", 0) > 0:  # shard actors owned by (and dying with) this replica
            from umarvel_ray.index.service import SearchService

            self.index = SearchService(options["index_shards"], options["index_shard_cpus"], device="cpu")
            self.index.load(sources["index"])
            head = self.index.first_ids(1000)
        else:
            self.index = load_index(sources["index"], device="cpu")
            head = self.index.ids[:1000]
        from pathlib import Path

        self.records = RecordStore(Path(sources["pool"]), Path(sources["data_root"]), sources["text_rule"])
        self.text_rule = sources["text_rule"]
        missing = [i for i in head if i not in self.records]
        if missing:
            raise ValueError(f"index ids missing from the pool {sources['pool']}: {missing[:5]}")
        self.dim = self.index.dim

    def __del__(self) -> None:  # Serve calls it on replica shutdown: the shard actors go with it
        index = getattr(self, "index", None)
        if index is not None:
            index.close()

    # ------------------------------------------------------------------ plumbing
    def _auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise ApiError(401, "missing or invalid bearer token", None, "invalid_api_key")

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        """Read at most max_body_bytes, then validate against `model` (422 naming the field)."""
        self._auth(request)
        cap = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ApiError(413, f"request body over {cap} bytes", None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, f"request body over {cap} bytes", None, "body_too_large")
            chunks.append(chunk)
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            raise validation_error(e) from None

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            return await method.remote(*args)
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise ApiError(503, f"overloaded, retry later ({type(e).__name__})", None, "overloaded") from None

    async def _embed(self, items: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
        """One handle call per item, so Serve batches them with other callers' items. Texts go
        through the text rule the pool was embedded with, as training and evaluation saw them."""
        items = [self._apply_text_rule(it, i) for i, it in enumerate(items)]
        return list(await asyncio.gather(*(self._call(self.embedder.embed, (role, it)) for it in items)))

    def _apply_text_rule(self, item: dict[str, Any], i: int) -> dict[str, Any]:
        if item.get("text") is None:
            return item
        text = apply_text_rule(item["text"], self.text_rule)
        if text is None and item.get("image") is None:
            raise ApiError(422, f"item {i}: text is empty under the '{self.text_rule}' text rule", "text")
        return {**item, "text": text}

    async def _score(self, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[float]:
        if self.reranker is None:
            raise ApiError(501, "no reranker is configured (start the app with reranker_dir=...)", None)
        return list(await asyncio.gather(*(self._call(self.reranker.score, p) for p in pairs)))

    def _items(self, items: list[schemas.Item], param: str, pixels: tuple[int, int]) -> list[dict[str, Any]]:
        return [model_item(it, self.limits, pixels, f"{param}[{i}]") for i, it in enumerate(items)]

    def _check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise ApiError(404, f"model {name!r} not found; this server serves {self.model_name!r}", "model", "model_not_found")

    def _record(self, rid: str, root: str = "") -> dict[str, Any]:
        if rid not in self.records:
            raise ApiError(404, f"unknown record id {rid!r}", "id", "record_not_found")
        return self.records.public(rid, root)

    # ------------------------------------------------------------------ health and metadata
    def check_health(self) -> None:
        if self.index is None or len(self.index) == 0:
            raise RuntimeError("no index loaded")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "index_size": len(self.index), "dim": self.dim}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        entry = {"id": self.model_name, "object": "model", "owned_by": "umarvel-ray", "dim": self.dim}
        return {"object": "list", "data": [entry]}

    # ------------------------------------------------------------------ embeddings
    @app.post("/v1/embed")
    async def embed(self, request: Request) -> dict[str, Any]:
        req = await self._body(request, schemas.EmbedRequest)
        if len(req.items) > self.limits.max_items:
            raise ApiError(422, f"items: {len(req.items)} items, over the {self.limits.max_items} limit", "items")
        items = self._items(req.items, "items", self.embed_pixels)
        outs = await self._embed(items, req.role)
        data = []
        for i, o in enumerate(outs):
            v = o["vector"]
            if req.normalize:
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            data.append({"index": i, "embedding": _encode(v, req.encoding_format)})
        usage = {
            "items": len(items),
            "images": sum(it["image"] is not None for it in items),
            "prompt_tokens": sum(o["tokens"] for o in outs),
        }
        return {"object": "list", "model": self.model_name, "dim": self.dim, "data": data, "usage": usage}

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        req = await self._body(request, schemas.OpenAIEmbeddingsRequest)
        self._check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.dim:
            raise ApiError(422, f"dimensions: only {self.dim} is supported (no truncation)", "dimensions")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or len(texts) > self.limits.max_items:
            raise ApiError(422, f"input: 1..{self.limits.max_items} strings required, got {len(texts)}", "input")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(422, f"input[{i}]: empty string", "input")
            check_text(t, self.limits, f"input[{i}]")
        outs = await self._embed([{"text": t, "image": None, "instruction": None} for t in texts], "query")
        data = []
        for i, o in enumerate(outs):
            v = o["vector"] / max(float(np.linalg.norm(o["vector"])), 1e-12)
            data.append({"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)})
        tokens = sum(o["tokens"] for o in outs)
        return {
            "object": "list",
            "data": data,
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ------------------------------------------------------------------ rerank
    def _rerank_query(self, query: schemas.Item | str) -> dict[str, Any]:
        if isinstance(query, str):
            if not query.strip():
                raise ApiError(422, "query: empty string", "query")
            query = schemas.Item(text=query)
        return model_item(query, self.limits, self.rerank_pixels, "query")

    def _document(self, doc: Any, i: int, root: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
        """(model item, what return_documents echoes) for a string, an item or a pool id."""
        if isinstance(doc, schemas.PoolRef):
            public = self._record(doc.id, root)
            return self.records.model_item(doc.id, self.rerank_pixels), public
        if isinstance(doc, str):
            if not doc.strip():
                raise ApiError(422, f"documents[{i}]: empty string", "documents")
            doc = schemas.Item(text=doc)
        item = model_item(doc, self.limits, self.rerank_pixels, f"documents[{i}]")
        return item, {"text": doc.text}

    @app.post("/v1/rerank")
    async def rerank(self, request: Request) -> dict[str, Any]:
        return await self._rerank_route(request)

    @app.post("/v2/rerank")
    async def rerank_v2(self, request: Request) -> dict[str, Any]:
        """Cohere's ClientV2 posts here; same body and answer as /v1/rerank."""
        return await self._rerank_route(request)

    async def _rerank_route(self, request: Request) -> dict[str, Any]:
        req = await self._body(request, schemas.RerankRequest)
        if len(req.documents) > self.limits.max_documents:
            raise ApiError(
                422, f"documents: {len(req.documents)}, over the {self.limits.max_documents} limit", "documents"
            )
        if req.top_n is not None and req.top_n > len(req.documents):
            raise ApiError(422, f"top_n: {req.top_n} is more than the {len(req.documents)} documents", "top_n")
        if self.reranker is None:
            raise ApiError(501, "no reranker is configured (start the app with reranker_dir=...)")
        query = self._rerank_query(req.query)
        docs = [self._document(d, i, _root(request)) for i, d in enumerate(req.documents)]
        scores = await self._score([(query, item) for item, _ in docs])
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[: req.top_n or len(docs)]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                r["document"] = docs[i][1]
            results.append(r)
        images = int(query["image"] is not None) + sum(item["image"] is not None for item, _ in docs)
        return {
            "id": _request_id(request),
            "model": self.model_name,
            "results": results,
            "usage": {"pairs": len(docs), "images": images},
            "meta": {"billed_units": {"search_units": 1}},
        }

    # ------------------------------------------------------------------ search
    @app.post("/v1/search")
    async def search(self, request: Request) -> dict[str, Any]:
        req = await self._body(request, schemas.SearchRequest)
        if req.k > self.limits.max_k:
            raise ApiError(422, f"k: {req.k} is over the {self.limits.max_k} limit", "k")
        if req.rerank and req.rerank_top_n > self.limits.max_rerank_top_n:
            raise ApiError(422, f"rerank_top_n: over the {self.limits.max_rerank_top_n} limit", "rerank_top_n")
        if req.rerank and self.reranker is None:
            raise ApiError(501, "no reranker is configured (start the app with reranker_dir=...)", "rerank")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        q_item = model_item(req.query, self.limits, self.embed_pixels, "query")
        rr_item = None
        if req.rerank:
            same = self.rerank_pixels == self.embed_pixels
            rr_item = q_item if same else model_item(req.query, self.limits, self.rerank_pixels, "query")
        timings["decode"] = _ms(t0)
        t0 = time.perf_counter()
        (out,) = await self._embed([q_item], req.query_role)
        v = out["vector"] / max(float(np.linalg.norm(out["vector"])), 1e-12)
        timings["embed"] = _ms(t0)
        t0 = time.perf_counter()
        depth = max(req.k, req.rerank_top_n) if req.rerank else req.k
        if hasattr(self.index, "search_arrays_async"):  # shard actors: await them, do not block the loop
            scores, ids = await self.index.search_arrays_async(v[None, :].astype(np.float32), depth)
        else:
            scores, ids = self.index.search_arrays(v[None, :].astype(np.float32), depth)
        hits = [(str(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i != ""]
        timings["search"] = _ms(t0)
        results: list[dict[str, Any]] = []
        if req.rerank:
            t0 = time.perf_counter()
            head, tail = hits[: req.rerank_top_n], hits[req.rerank_top_n :]
            assert rr_item is not None
            p_yes = await self._score([(rr_item, self.records.model_item(i, self.rerank_pixels)) for i, _ in head])
            w = self.fusion_weight if req.fusion_weight is None else req.fusion_weight
            fused = fuse([s for _, s in head], p_yes, w)
            order = rank_fused([i for i, _ in head], [s for _, s in head], p_yes, w)
            for j in order:
                i, s = head[j]
                results.append({"id": i, "score": fused[j], "retrieval_score": s, "rerank_score": p_yes[j]})
            results += [{"id": i, "score": s, "retrieval_score": s} for i, s in tail]
            timings["rerank"] = _ms(t0)
        else:
            results = [{"id": i, "score": s, "retrieval_score": s} for i, s in hits]
        results = results[: req.k]
        for rank, r in enumerate(results, start=1):
            r["rank"] = rank
            if req.return_records:
                r["record"] = self.records.public(r["id"], _root(request))
        return {"id": _request_id(request), "model": self.model_name, "results": results, "timings_ms": timings}

    # ------------------------------------------------------------------ records
    @app.get("/v1/records/{rid}")
    async def record(self, rid: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        return self._record(rid, _root(request))

    @app.get("/v1/records/{rid}/image")
    async def record_image(self, rid: str, request: Request) -> Response:
        self._auth(request)
        self._record(rid)
        try:
            data, mime = self.records.image_bytes(rid)
        except FileNotFoundError:
            raise ApiError(404, f"record {rid!r} has no image", "id", "image_not_found") from None
        return Response(content=data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @app.get("/")
    async def page(self, request: Request) -> HTMLResponse:
        from umarvel_ray.serve.page import render_page

        return HTMLResponse(render_page(_root(request)))


def ingress_options(sources: Any, cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sources, options) as plain dicts: what the Retriever constructor receives."""
    options = {
        "limits": asdict(cfg.limits),
        "model_name": cfg.model_name,
        "api_key": cfg.api_key,
        "fusion_weight": cfg.fusion_weight,
        "retry_after_s": cfg.retry_after_s,
        "index_shards": cfg.index_shards,
        "index_shard_cpus": cfg.index_shard_cpus,
    }
    return asdict(sources), options
