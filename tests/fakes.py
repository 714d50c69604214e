"""Deterministic fake providers (no model, no network) and helpers to build an app around them.

Vectors are a hash of (input_type, instruction, text): equal inputs give equal vectors in any batch, queries and
documents differ, and every vector is L2-normalised float32. The reranker scores the share of query words that a
document contains. Each fake records its calls so tests can assert what the API passed on.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from backend.api.state import Services
from backend.config import Settings
from backend.providers.base import (
    BaseEmbeddingProvider,
    BaseMultimodalEmbeddingProvider,
    BaseRerankerProvider,
    InputType,
    ProviderInfo,
)


def fake_vector(key: str, dim: int) -> np.ndarray:
    """A unit float32 vector determined by `key` alone."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeEmbeddingProvider(BaseEmbeddingProvider):
    """Hash vectors of width `dim`; `dimensions` slices and re-normalises (Matryoshka-like)."""

    def __init__(self, dim: int = 8, model: str = "fake-embedding") -> None:
        self.dim = dim
        self.model = model
        self.calls: list[dict[str, Any]] = []
        self.closed = False
        self.warmed_up = False

    @property
    def embedding_dim(self) -> int:
        return self.dim

    @property
    def max_token_size(self) -> int:
        return 512

    async def count_tokens(self, texts: list[str]) -> int | None:
        return sum(len(text.split()) for text in texts)

    async def warmup(self) -> None:
        self.warmed_up = True

    async def embed(
        self,
        texts: list[str],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        call = {"texts": list(texts), "input_type": input_type, "instruction": instruction, "dimensions": dimensions}
        self.calls.append(call)
        width = dimensions or self.dim
        if not texts:
            return np.zeros((0, width), dtype=np.float32)
        rows = [fake_vector(f"{input_type}|{instruction}|{text}", self.dim)[:width] for text in texts]
        matrix = np.stack(rows)
        return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model=self.model, dimension=self.dim, device="cpu", dtype="float32")

    async def close(self) -> None:
        self.closed = True


class FakeRerankerProvider(BaseRerankerProvider):
    """Score = share of the query's words found in the document (0..1); higher = more relevant."""

    def __init__(self, model: str = "fake-reranker") -> None:
        self.model = model
        self.calls: list[dict[str, Any]] = []
        self.closed = False

    async def rerank(
        self, query: str, documents: list[str], *, instruction: str | None = None, **kwargs: Any
    ) -> list[float]:
        self.calls.append({"query": query, "documents": list(documents), "instruction": instruction})
        words = set(query.lower().split())
        return [len(words & set(doc.lower().split())) / max(len(words), 1) for doc in documents]

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model=self.model, device="cpu", dtype="float32")

    async def close(self) -> None:
        self.closed = True


class FakeMultimodalProvider(FakeEmbeddingProvider, BaseMultimodalEmbeddingProvider):
    """Texts as FakeEmbeddingProvider; an image is hashed from its repr; a pair from both."""

    def __init__(self, dim: int = 16, model: str = "fake-multimodal") -> None:
        super().__init__(dim=dim, model=model)

    async def embed_images(
        self, images: list[Any], *, input_type: InputType = "document", instruction: str | None = None
    ) -> np.ndarray:
        rows = [fake_vector(f"image|{image!r}", self.dim) for image in images]
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    async def embed_fused(
        self,
        texts: list[str],
        images: list[Any],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
    ) -> np.ndarray:
        if len(texts) != len(images):
            raise ValueError("texts and images must have equal length")
        rows = [fake_vector(f"fused|{text}|{image!r}", self.dim) for text, image in zip(texts, images, strict=True)]
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)


def make_settings(**groups: dict[str, Any]) -> Settings:
    """Settings from the defaults plus per-group overrides, e.g. make_settings(backend={"api_key": "k"})."""
    return Settings.load(env_file=None, **groups)


def make_services(
    *,
    embedding: BaseEmbeddingProvider | None = None,
    reranker: BaseRerankerProvider | None = None,
    multimodal: BaseMultimodalEmbeddingProvider | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Services:
    """Services around fakes. Settings: the served names are the fakes' model names, the enabled flags follow the
    fakes given, and `overrides` (group -> fields, e.g. {"backend": {"api_key": "k"}}) is applied on top."""
    embedding = embedding or FakeEmbeddingProvider()
    groups: dict[str, dict[str, Any]] = {
        "embedding": {"model_name": embedding.info().model},
        "reranker": {"enabled": reranker is not None},
        "multimodal": {"enabled": multimodal is not None},
    }
    if reranker is not None:
        groups["reranker"]["model_name"] = reranker.info().model
    if multimodal is not None:
        groups["multimodal"]["model_name"] = multimodal.info().model
    for group, fields in (overrides or {}).items():
        groups.setdefault(group, {}).update(fields)
    return Services(
        settings=make_settings(**groups), embedding=embedding, reranker=reranker, multimodal=multimodal
    )
