"""Request models of the API (pydantic, `extra="forbid"` so a typo is a 422 naming the field).

Range checks that depend on config (item counts, k) live in the ingress, which knows the limits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Item(Strict):
    """A query or candidate: text and/or image (base64 or a data: URI), optional task instruction."""

    text: str | None = None
    image: str | None = None
    instruction: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Item:
        if not (self.text and self.text.strip()) and not self.image:
            raise ValueError("an item needs text or image")
        return self


class PoolRef(Strict):
    """A pool candidate by id: reranked without uploading it again."""

    id: str = Field(min_length=1)


class EmbedRequest(Strict):
    items: list[Item] = Field(min_length=1)
    role: Literal["query", "candidate"] = "query"
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"


class OpenAIEmbeddingsRequest(Strict):
    """OpenAI's /v1/embeddings body; texts are embedded as queries without instruction."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class RerankRequest(Strict):
    """Cohere/Jina/vLLM rerank body; query and documents may be plain strings (their clients send those)."""

    query: Item | str
    documents: list[Item | PoolRef | str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    model: str | None = None
    max_tokens_per_doc: int | None = None


class SearchRequest(Strict):
    """`query_role="candidate"` embeds the query with the candidate template (find near-duplicates)."""

    query: Item
    query_role: Literal["query", "candidate"] = "query"
    k: int = Field(default=10, ge=1)
    rerank: bool = False
    rerank_top_n: int = Field(default=50, ge=1)
    fusion_weight: float | None = None
    return_records: bool = True
