"""Deterministic stand-ins for the RAG tests: bag-of-words embeddings, a word-overlap reranker and a multimodal
embedder whose "images" are strings like "image:red apple" (text and image vectors share one space)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from backend.providers.base import (
    BaseEmbeddingProvider,
    BaseMultimodalEmbeddingProvider,
    BaseRerankerProvider,
    ProviderInfo,
)

_WORD = re.compile(r"[a-z0-9]+")


def bag_of_words(text: str, dim: int, salt: str = "") -> np.ndarray:
    """A normalised hashed bag of words: texts sharing words have a positive cosine."""
    vector = np.zeros(dim, dtype=np.float32)
    for word in _WORD.findall(text.lower()):
        digest = hashlib.sha256((salt + word).encode()).digest()
        vector[int.from_bytes(digest[:4], "little") % dim] += 1.0
    if not vector.any():
        vector[0] = 1.0
    return vector / np.linalg.norm(vector)


class FakeEmbedding(BaseEmbeddingProvider):
    def __init__(self, dim: int = 64, name: str = "fake-bow") -> None:
        self.dim = dim
        self.name = name
        self.calls: list[tuple[list[str], str]] = []

    @property
    def embedding_dim(self) -> int:
        return self.dim

    async def embed(self, texts: list[str], *, input_type: str = "document", instruction: str | None = None,
                    dimensions: int | None = None, **kwargs: Any) -> np.ndarray:
        self.calls.append((list(texts), input_type))
        return np.stack([bag_of_words(t, self.dim) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model=self.name, dimension=self.dim)


class FakeReranker(BaseRerankerProvider):
    """Score = shared words / question words, so the passage repeating the question wins."""

    def __init__(self) -> None:
        self.calls = 0

    async def rerank(self, query: str, documents: list[str], *, instruction: str | None = None,
                     **kwargs: Any) -> list[float]:
        self.calls += 1
        words = set(_WORD.findall(query.lower()))
        return [len(words & set(_WORD.findall(d.lower()))) / max(len(words), 1) for d in documents]

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model="fake-overlap")


class FakeMultimodal(BaseMultimodalEmbeddingProvider):
    """Images are strings "image:<words>"; an image embeds like the words it shows (salted apart from text)."""

    def __init__(self, dim: int = 48) -> None:
        self.dim = dim

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def _vec(self, text: str) -> np.ndarray:
        return bag_of_words(text, self.dim, salt="mm")

    async def embed(self, texts: list[str], *, input_type: str = "document", instruction: str | None = None,
                    dimensions: int | None = None, **kwargs: Any) -> np.ndarray:
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    async def embed_images(self, images: list[Any], *, input_type: str = "document",
                           instruction: str | None = None) -> np.ndarray:
        return np.stack([self._vec(str(image).removeprefix("image:")) for image in images])

    async def embed_fused(self, texts: list[str], images: list[Any], *, input_type: str = "document",
                          instruction: str | None = None) -> np.ndarray:
        return np.stack([self._vec(str(image).removeprefix("image:")) for image in images])

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model="fake-mm", dimension=self.dim)
