"""ModelFactory: builds providers from settings through one registry table.

The table maps (model type, provider type) to "module:Class". Modules are imported only when used, so an
online-only deployment never imports torch. An unknown or unavailable combination is one clear error.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.config import ModelConfig, ModelType, ProviderType
from backend.errors import ConfigurationError
from backend.providers.base import BaseEmbeddingProvider, BaseMultimodalEmbeddingProvider, BaseRerankerProvider

PROVIDER_REGISTRY: dict[tuple[ModelType, ProviderType], str] = {
    (ModelType.EMBEDDING, ProviderType.OPENAI): "backend.providers.openai_compat:OpenAICompatibleEmbeddingProvider",
    (ModelType.EMBEDDING, ProviderType.JINA): "backend.providers.jina:JinaEmbeddingProvider",
    (ModelType.RERANKER, ProviderType.JINA): "backend.providers.jina:JinaRerankerProvider",
    (ModelType.EMBEDDING, ProviderType.LOCAL_GPU): "backend.providers.local_embedding:LocalEmbeddingProvider",
    (ModelType.RERANKER, ProviderType.LOCAL_GPU): "backend.providers.local_reranker:LocalRerankerProvider",
    (ModelType.MULTIMODAL_EMBEDDING, ProviderType.LOCAL_GPU): (
        "backend.providers.multimodal:MultimodalEmbeddingProvider"
    ),
}


def provider_class(model_type: ModelType, provider: ProviderType) -> type:
    """The class registered for this combination; ConfigurationError naming the choices when there is none."""
    target = PROVIDER_REGISTRY.get((model_type, provider))
    if target is None:
        choices = sorted(p.value for (m, p) in PROVIDER_REGISTRY if m == model_type)
        raise ConfigurationError(
            f"No {model_type.value} provider '{provider.value}': choose one of {choices}",
            model_type=model_type.value,
            provider=provider.value,
        )
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"The {model_type.value} provider '{provider.value}' is unavailable: {exc}. "
            "Install the backend's requirements (requirements-backend.txt)."
        ) from exc
    return getattr(module, class_name)


def create_embedding_provider(config: ModelConfig) -> BaseEmbeddingProvider:
    return provider_class(ModelType.EMBEDDING, config.provider)(config)


def create_reranker(config: ModelConfig) -> BaseRerankerProvider | None:
    """The configured reranker, or None when RERANKER_ENABLED is false."""
    if not getattr(config, "enabled", True):
        return None
    return provider_class(ModelType.RERANKER, config.provider)(config)


def create_multimodal_provider(config: ModelConfig) -> BaseMultimodalEmbeddingProvider | None:
    """The configured multimodal embedder, or None when MULTIMODAL_EMBEDDING_ENABLED is false."""
    if not getattr(config, "enabled", True):
        return None
    return provider_class(ModelType.MULTIMODAL_EMBEDDING, config.provider)(config)


@dataclass
class EmbeddingFunc:
    """LightRAG / RAG-Anything compatible embedding function: `await func(texts) -> np.ndarray`."""

    embedding_dim: int
    max_token_size: int
    func: Callable[..., Awaitable[np.ndarray]]

    async def __call__(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        return await self.func(texts, **kwargs)


def create_embedding_func(provider: BaseEmbeddingProvider) -> EmbeddingFunc:
    """Wrap a provider for LightRAG / RAG-Anything (documents are embedded raw, as they expect)."""
    return EmbeddingFunc(
        embedding_dim=provider.embedding_dim, max_token_size=provider.max_token_size, func=provider.embed
    )
