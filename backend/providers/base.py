"""The provider interfaces every model implementation satisfies (online or local).

Contracts shared by all providers:
- Every public method is async and never blocks the event loop (model work runs in worker threads).
- Embeddings are `numpy.ndarray`, dtype float32, shape (n, dim); row i belongs to input i. Empty input gives
  shape (0, dim). Vectors are L2-normalised unless the provider says otherwise.
- Bad input raises `InvalidRequestError` (or `InvalidInputTypeError` for wrong types) naming the limit and value;
  upstream failures raise `UpstreamError`; nothing is silently dropped or replaced.
- `close()` releases the model / connections; it is idempotent.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

InputType = Literal["query", "document"]


@dataclass
class ProviderInfo:
    """What /api/health shows about a provider. Never holds secrets."""

    provider: str
    model: str
    dimension: int | None = None
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    memory_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**{k: v for k, v in data.items() if v is not None}, **extra}


class BaseProvider(abc.ABC):
    """Life cycle shared by all providers."""

    async def warmup(self) -> None:  # noqa: B027 - a no-op default is the contract for providers with nothing to warm
        """Prepare for traffic (load, run a full-budget forward). Called once by the app's lifespan."""

    @abc.abstractmethod
    def info(self) -> ProviderInfo:
        """Describe the provider for /api/health."""

    async def close(self) -> None:  # noqa: B027 - providers without resources need no override
        """Release the model or connections. Idempotent."""


class BaseEmbeddingProvider(BaseProvider):
    """Turns texts into vectors."""

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """Width of the vectors `embed` returns by default."""

    @property
    def max_token_size(self) -> int:
        """Longest input in tokens the provider embeds without truncation."""
        return 8192

    async def count_tokens(self, texts: list[str]) -> int | None:
        """Tokens `texts` occupy (the `usage` of /v1/embeddings); None when the provider cannot count them."""
        return None

    @abc.abstractmethod
    async def embed(
        self,
        texts: list[str],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed `texts`; returns float32 (len(texts), dimensions or embedding_dim), row i for texts[i].

        input_type="query" applies the provider's query instruction (or `instruction`); documents are embedded raw.
        `dimensions` asks for a shorter (Matryoshka) vector where the model supports it.
        """


class BaseRerankerProvider(BaseProvider):
    """Scores documents against a query."""

    @abc.abstractmethod
    async def rerank(
        self, query: str, documents: list[str], *, instruction: str | None = None, **kwargs: Any
    ) -> list[float]:
        """One score per document, in input order; higher = more relevant. Empty documents give []."""


class BaseMultimodalEmbeddingProvider(BaseEmbeddingProvider):
    """Embeds texts, images and text+image pairs into one space.

    Images may be a file path, raw bytes, a base64 string / data URI, or a PIL image; invalid images raise
    `InvalidImageError`. All three methods return float32 (n, embedding_dim), L2-normalised.
    """

    @abc.abstractmethod
    async def embed_images(
        self, images: list[Any], *, input_type: InputType = "document", instruction: str | None = None
    ) -> np.ndarray:
        """Embed images alone."""

    @abc.abstractmethod
    async def embed_fused(
        self,
        texts: list[str],
        images: list[Any],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
    ) -> np.ndarray:
        """Embed pairs (texts[i], images[i]) as one input each; the lists must have equal length."""
