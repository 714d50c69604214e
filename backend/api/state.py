"""What a running app holds: the settings and the providers built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.config import Settings
from backend.providers.base import BaseEmbeddingProvider, BaseMultimodalEmbeddingProvider, BaseRerankerProvider


@dataclass
class Services:
    """The providers of one app. `reranker` / `multimodal` are None when disabled; `rag` once the store is up."""

    settings: Settings
    embedding: BaseEmbeddingProvider
    reranker: BaseRerankerProvider | None = None
    multimodal: BaseMultimodalEmbeddingProvider | None = None
    rag: Any | None = None
    ready: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    async def close(self) -> None:
        """Close everything this app built, the RAG service first (it uses the providers)."""
        self.ready = False
        for closable in (self.rag, self.multimodal, self.reranker, self.embedding):
            if closable is not None:
                await closable.close()
