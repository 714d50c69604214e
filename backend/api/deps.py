"""Request dependencies: the app's services, each provider (or a clear error when disabled), and auth."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from backend.api.state import Services
from backend.errors import AuthenticationError, NotReadyError, ProviderDisabledError
from backend.providers.base import BaseEmbeddingProvider, BaseMultimodalEmbeddingProvider, BaseRerankerProvider

_bearer = HTTPBearer(auto_error=False)


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        raise NotReadyError("The backend is starting or shutting down; retry shortly")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """When BACKEND_API_KEY is set, every protected route needs `Authorization: Bearer <key>` (constant-time)."""
    services: Services | None = getattr(request.app.state, "services", None)
    settings = services.settings if services is not None else request.app.state.settings
    expected = settings.backend.api_key if settings is not None else None
    if expected is None or not expected.get_secret_value():  # an empty key means no auth, never "any key"
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise AuthenticationError("Missing or invalid API key: send 'Authorization: Bearer <BACKEND_API_KEY>'")


def get_embedding_provider(services: ServicesDep) -> BaseEmbeddingProvider:
    return services.embedding


def get_reranker(services: ServicesDep) -> BaseRerankerProvider:
    if services.reranker is None:
        raise ProviderDisabledError("The reranker is disabled: set RERANKER_ENABLED=true to serve reranking")
    return services.reranker


def get_multimodal_provider(services: ServicesDep) -> BaseMultimodalEmbeddingProvider:
    if services.multimodal is None:
        raise ProviderDisabledError(
            "Multimodal embedding is disabled: set MULTIMODAL_EMBEDDING_ENABLED=true to serve it"
        )
    return services.multimodal


def get_rag_service(services: ServicesDep) -> Any:
    if services.rag is None:
        raise NotReadyError("The RAG service (vector store) is not available")
    return services.rag


EmbeddingDep = Annotated[BaseEmbeddingProvider, Depends(get_embedding_provider)]
RerankerDep = Annotated[BaseRerankerProvider, Depends(get_reranker)]
MultimodalDep = Annotated[BaseMultimodalEmbeddingProvider, Depends(get_multimodal_provider)]
RagDep = Annotated[Any, Depends(get_rag_service)]
# Routers that need auth declare `dependencies=[Depends(require_api_key)]`.
AUTH = [Depends(require_api_key)]
