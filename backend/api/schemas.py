"""Request and response bodies of the HTTP API, and the request limits that come from the settings.

Static rules (types, non-empty lists, non-empty query, positive numbers) live in the models: FastAPI answers 422
with the field and the reason. Limits that the settings define (BACKEND_MAX_ITEMS_PER_REQUEST,
BACKEND_MAX_CHARS_PER_ITEM, RERANKER_MAX_DOCUMENTS) are checked by `RequestLimits`, which the routes run as a
dependency right after parsing: it raises InvalidRequestError (422) naming the limit, its variable and the value
received, e.g. "texts has 10001 items; the limit is 10000 (BACKEND_MAX_ITEMS_PER_REQUEST)".
Items must be JSON strings; numbers, nulls or objects are refused, not converted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, StrictStr, field_validator

from backend.config import Settings
from backend.errors import InvalidRequestError, NonFiniteOutputError
from backend.providers.base import BaseEmbeddingProvider, InputType


# --- limits from the settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestLimits:
    """The per-request limits of one deployment (see BackendConfig and RerankerConfig)."""

    max_items: int
    max_chars: int
    max_documents: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_items=settings.backend.max_items_per_request,
            max_chars=settings.backend.max_chars_per_item,
            max_documents=settings.reranker.max_documents,
        )

    def check_items(self, name: str, items: Sequence[str]) -> None:
        """Items per request and characters per item."""
        _at_most(name, len(items), self.max_items, "BACKEND_MAX_ITEMS_PER_REQUEST")
        for i, item in enumerate(items):
            self.check_text(f"{name}[{i}]", item)

    def check_text(self, name: str, text: str) -> None:
        if len(text) > self.max_chars:
            raise InvalidRequestError(
                f"{name} has {len(text)} characters; the limit is {self.max_chars} (BACKEND_MAX_CHARS_PER_ITEM)",
                limit=self.max_chars,
                received=len(text),
                variable="BACKEND_MAX_CHARS_PER_ITEM",
            )

    def check_documents(self, query: str, documents: Sequence[str]) -> None:
        """A rerank call: the query's length, then documents against RERANKER_MAX_DOCUMENTS and the item limits."""
        self.check_text("query", query)
        _at_most("documents", len(documents), self.max_documents, "RERANKER_MAX_DOCUMENTS")
        self.check_items("documents", documents)


def _at_most(name: str, count: int, limit: int, variable: str) -> None:
    if count > limit:
        raise InvalidRequestError(
            f"{name} has {count} items; the limit is {limit} ({variable})",
            limit=limit,
            received=count,
            variable=variable,
        )


def check_dimensions(dimensions: int | None, provider: BaseEmbeddingProvider) -> None:
    """`dimensions` may shorten a vector (Matryoshka), never widen it beyond the served width."""
    if dimensions is not None and dimensions > provider.embedding_dim:
        raise InvalidRequestError(
            f"dimensions is {dimensions}; the model's width is {provider.embedding_dim}",
            limit=provider.embedding_dim,
            received=dimensions,
        )


def ensure_finite(vectors: np.ndarray) -> None:
    """A NaN/Inf is an error (JSON has no NaN), never sent or replaced."""
    if not np.isfinite(vectors).all():
        raise NonFiniteOutputError("The model produced non-finite values (NaN/Inf); nothing was returned")


def finite_rows(vectors: np.ndarray) -> list[list[float]]:
    """Vectors as JSON-ready rows of floats, after `ensure_finite`."""
    ensure_finite(vectors)
    return vectors.tolist()


# --- /api/embed --------------------------------------------------------------------------------------------
class EmbedRequest(BaseModel):
    texts: list[StrictStr] = Field(min_length=1, description="Texts to embed (at most BACKEND_MAX_ITEMS_PER_REQUEST)")
    input_type: InputType = Field("document", description="query: the query instruction is applied; document: raw")
    instruction: str | None = Field(None, description="Overrides the provider's query instruction")
    dimensions: int | None = Field(None, ge=1, description="Shorter (Matryoshka) vectors, at most the model's width")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model: str


# --- /api/rerank and /v1/rerank ----------------------------------------------------------------------------
class RerankRequest(BaseModel):
    query: StrictStr
    documents: list[StrictStr] = Field(min_length=1, description="At most RERANKER_MAX_DOCUMENTS documents")
    top_n: int | None = Field(None, ge=1, description="Keep the best N results (default: all)")
    return_documents: bool = Field(False, description="Repeat each document's text in its result")
    instruction: str | None = Field(None, description="Overrides the reranker's judging instruction")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request")
    relevance_score: float
    document: str | None = None


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult] = Field(description="Sorted by relevance_score, best first")


class CompatRerankRequest(RerankRequest):
    """Cohere / Jina shape: `model` is optional and, when given, must be the served reranker."""

    model: str | None = None
    return_documents: bool = True


class CompatRerankDocument(BaseModel):
    text: str


class CompatRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: CompatRerankDocument | None = None


class CompatRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CompatRerankResult]


# --- OpenAI-compatible /v1 ---------------------------------------------------------------------------------
class OpenAIEmbeddingRequest(BaseModel):
    input: StrictStr | list[StrictStr] = Field(description="One text or a list of texts (token arrays: not served)")
    model: str = Field(description="A served name from GET /v1/models")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must contain at least one text")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 bytes")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# --- /api/health -------------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok", "starting"]
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per slot: provider, model, device, dtype, dimension, memory where known"
    )
    store: dict[str, Any] | None = Field(default=None, description="The vector store: URI, collection, dimensions")


def api_image(source: str) -> str:
    """An API image string as the provider reads it: never a file path (callers must not read server files)."""
    head = source.lstrip()[:8].lower()
    if head.startswith(("data:", "http://", "https://")):
        return source
    return f"data:;base64,{source}"
