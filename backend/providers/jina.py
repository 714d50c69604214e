"""Jina AI's embeddings and rerank APIs (https://api.jina.ai/v1 unless BASE_URL says otherwise).

Embeddings: POST /embeddings {model, input, task, dimensions?, normalized: true, embedding_type: "float"};
`task` is "retrieval.query" for queries and "retrieval.passage" for documents (jina-embeddings-v3 style).
Rerank: POST /rerank {model, query, documents, top_n, return_documents: false} -> {results: [{index,
relevance_score}]}; scores come back in input order. Both need an API key (the *_API_KEY setting).
Neither API takes a free-text instruction: a per-call `instruction` is refused (HTTP 422), not dropped.
"""

from __future__ import annotations

import math
from typing import Any

from backend.config import ModelConfig
from backend.errors import ConfigurationError, InvalidInputTypeError, InvalidRequestError, UpstreamError
from backend.providers.base import BaseRerankerProvider, InputType, ProviderInfo
from backend.providers.http_client import UpstreamClient
from backend.providers.openai_compat import OpenAICompatibleEmbeddingProvider

JINA_BASE_URL = "https://api.jina.ai/v1"
JINA_TASKS: dict[str, str] = {"query": "retrieval.query", "document": "retrieval.passage"}


def _require_key(config: ModelConfig) -> None:
    if config.api_key is None or not config.api_key.get_secret_value():
        raise ConfigurationError(
            f"{config.env_prefix()}API_KEY is required for the 'jina' provider",
            variable=f"{config.env_prefix()}API_KEY",
        )


class JinaEmbeddingProvider(OpenAICompatibleEmbeddingProvider):
    """Jina embeddings: the OpenAI wire format plus `task` (from input_type) and `normalized`."""

    provider_name = "jina"
    default_base_url = JINA_BASE_URL

    def __init__(self, config: ModelConfig) -> None:
        _require_key(config)
        super().__init__(config)

    def _payload(self, texts: list[str], *, input_type: InputType, dimensions: int | None) -> dict[str, Any]:
        if input_type not in JINA_TASKS:
            raise InvalidRequestError(f"input_type must be one of {sorted(JINA_TASKS)} (received {input_type!r})")
        payload: dict[str, Any] = {
            "model": self.config.model_name,
            "input": texts,
            "task": JINA_TASKS[input_type],
            "normalized": True,
            "embedding_type": "float",
        }
        if dimensions is not None:
            payload["dimensions"] = dimensions
        return payload


class JinaRerankerProvider(BaseRerankerProvider):
    """Jina rerank: one upstream call per API_BATCH_SIZE documents; scores returned in input order."""

    provider_name = "jina"

    def __init__(self, config: ModelConfig) -> None:
        _require_key(config)
        self.config = config
        self._client = UpstreamClient(
            provider=self.provider_name,
            base_url=config.base_url or JINA_BASE_URL,
            api_key=config.api_key,
            timeout=config.request_timeout,
            max_retries=config.max_retries,
            retry_backoff=config.retry_backoff,
        )

    async def rerank(
        self, query: str, documents: list[str], *, instruction: str | None = None, **kwargs: Any
    ) -> list[float]:
        """One relevance_score per document, in input order (higher = more relevant)."""
        if instruction is not None:
            raise InvalidRequestError(
                f"The 'jina' reranker takes no instruction (received {instruction!r})", provider=self.provider_name
            )
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError(f"query must be a non-empty string (received {query!r})")
        for i, document in enumerate(documents):
            if not isinstance(document, str):
                raise InvalidInputTypeError(f"documents[{i}] is {type(document).__name__}, not a string")
        scores: list[float] = []
        step = self.config.api_batch_size
        for start in range(0, len(documents), step):
            scores.extend(await self._request(query, documents[start : start + step]))
        return scores

    async def _request(self, query: str, documents: list[str]) -> list[float]:
        body = await self._client.post_json(
            "rerank",
            {
                "model": self.config.model_name,
                "query": query,
                "documents": documents,
                "top_n": len(documents),
                "return_documents": False,
            },
        )
        return parse_rerank(body, expected=len(documents), provider=self.provider_name)

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=self.provider_name,
            model=self.config.model_name,
            extra={"base_url": self._client.public_url, "api_batch_size": self.config.api_batch_size},
        )

    async def close(self) -> None:
        await self._client.close()


def parse_rerank(body: Any, *, expected: int, provider: str) -> list[float]:
    """Scores in input order from {results: [{index, relevance_score}]}; UpstreamError unless one per document."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise UpstreamError(f"{provider} answered without a 'results' list", provider=provider)
    scores: dict[int, float] = {}
    for item in results:
        try:
            scores[int(item["index"])] = float(item["relevance_score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"{provider} answered a malformed rerank result {item!r}", provider=provider) from exc
    if sorted(scores) != list(range(expected)) or len(results) != expected:
        raise UpstreamError(
            f"{provider} answered {len(results)} rerank results for {expected} documents", provider=provider
        )
    if not all(math.isfinite(score) for score in scores.values()):
        raise UpstreamError(f"{provider} answered non-finite relevance scores (NaN/Inf)", provider=provider)
    return [scores[i] for i in range(expected)]
