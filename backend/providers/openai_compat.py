"""Embeddings from any OpenAI-compatible `/embeddings` endpoint (OpenAI, Azure-style gateways, vLLM, TEI, Infinity).

Settings (EMBEDDING_*): BASE_URL (required, ".../v1"), API_KEY, MODEL_NAME (sent as `model`), EMBEDDING_DIM
(sent as `dimensions` when set), API_BATCH_SIZE (inputs per upstream call; OpenAI allows 2048), REQUEST_TIMEOUT,
MAX_RETRIES, RETRY_BACKOFF. Vectors are returned as the API gives them (OpenAI's are L2-normalised), as float32,
row i for input i (the answer is ordered by its `index` field, whatever order it arrives in).

The OpenAI embeddings API has no query/document distinction: `input_type` changes nothing, and an explicit
per-call `instruction` is refused (HTTP 422) rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.config import ModelConfig
from backend.errors import (
    ConfigurationError,
    InvalidInputTypeError,
    InvalidRequestError,
    NotReadyError,
    UpstreamError,
)
from backend.providers.base import BaseEmbeddingProvider, InputType, ProviderInfo
from backend.providers.http_client import UpstreamClient

# The text of the start-up probe that checks URL, key and width (one short input).
PROBE_TEXT = "dimension probe"


class OpenAICompatibleEmbeddingProvider(BaseEmbeddingProvider):
    """OpenAI wire format: POST {model, input: [str], encoding_format: "float", dimensions?} -> {data: [...]}."""

    provider_name = "openai"
    default_base_url: str | None = None

    def __init__(self, config: ModelConfig) -> None:
        base_url = config.base_url or self.default_base_url
        if not base_url:
            raise ConfigurationError(
                f"{config.env_prefix()}BASE_URL is required for the '{self.provider_name}' provider",
                variable=f"{config.env_prefix()}BASE_URL",
            )
        self.config = config
        self._dim = config.embedding_dim
        self._client = UpstreamClient(
            provider=self.provider_name,
            base_url=base_url,
            api_key=config.api_key,
            timeout=config.request_timeout,
            max_retries=config.max_retries,
            retry_backoff=config.retry_backoff,
        )

    @property
    def embedding_dim(self) -> int:
        if self._dim is None:
            raise NotReadyError(
                f"The width of {self.config.model_name} is not known yet: set {self.config.env_prefix()}EMBEDDING_DIM "
                "or let warmup() probe it"
            )
        return self._dim

    async def warmup(self) -> None:
        """Probe the API once (checks URL, key and width) when WARMUP is on or the width is not configured.

        With EMBEDDING_DIM set, the probe asks for that width and fails (UpstreamError) if the API returns another.
        """
        if self._dim is not None and not self.config.warmup:
            return
        probe = await self._request([PROBE_TEXT], input_type="document", dimensions=self.config.embedding_dim)
        self._dim = probe.shape[1]

    async def embed(
        self,
        texts: list[str],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 (len(texts), dimensions or embedding_dim); one upstream call per API_BATCH_SIZE inputs."""
        if instruction is not None:
            raise InvalidRequestError(
                f"The '{self.provider_name}' embedding provider takes no instruction (received {instruction!r})",
                provider=self.provider_name,
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputTypeError(f"texts[{i}] is {type(text).__name__}, not a string")
        width = dimensions or self.config.embedding_dim
        if not texts:
            return np.zeros((0, width or self.embedding_dim), dtype=np.float32)
        step = self.config.api_batch_size
        parts = [
            await self._request(texts[start : start + step], input_type=input_type, dimensions=width)
            for start in range(0, len(texts), step)
        ]
        return np.concatenate(parts, axis=0)

    def _payload(self, texts: list[str], *, input_type: InputType, dimensions: int | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.config.model_name, "input": texts, "encoding_format": "float"}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        return payload

    async def _request(self, texts: list[str], *, input_type: InputType, dimensions: int | None) -> np.ndarray:
        body = await self._client.post_json(
            "embeddings", self._payload(texts, input_type=input_type, dimensions=dimensions)
        )
        return parse_embeddings(body, expected=len(texts), dimensions=dimensions, provider=self.provider_name)

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=self.provider_name,
            model=self.config.model_name,
            dimension=self._dim,
            extra={"base_url": self._client.public_url, "api_batch_size": self.config.api_batch_size},
        )

    async def close(self) -> None:
        await self._client.close()


def parse_embeddings(body: Any, *, expected: int, dimensions: int | None, provider: str) -> np.ndarray:
    """The `data` of an embeddings answer as float32 (expected, dim), ordered by each item's `index`.

    Raises UpstreamError when the answer does not hold exactly one finite vector per input, of one width
    (equal to `dimensions` when that was asked for).
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise UpstreamError(f"{provider} answered without a 'data' list", provider=provider)
    indices = sorted(item.get("index", -1) if isinstance(item, dict) else -1 for item in data)
    if indices != list(range(expected)):
        raise UpstreamError(
            f"{provider} answered {len(data)} embeddings (indices {indices[:10]}...) for {expected} inputs",
            provider=provider,
        )
    try:
        vectors = np.asarray(
            [item["embedding"] for item in sorted(data, key=lambda item: item["index"])], dtype=np.float32
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(
            f"{provider} answered embeddings that are not lists of numbers: {exc}", provider=provider
        ) from exc
    if vectors.ndim != 2:
        raise UpstreamError(f"{provider} answered embeddings of different widths", provider=provider)
    if dimensions is not None and vectors.shape[1] != dimensions:
        raise UpstreamError(
            f"{provider} answered {vectors.shape[1]}-d vectors although dimensions={dimensions} was asked",
            provider=provider,
        )
    if not np.isfinite(vectors).all():
        raise UpstreamError(f"{provider} answered non-finite values (NaN/Inf)", provider=provider)
    return vectors
