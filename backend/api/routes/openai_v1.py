"""OpenAI-compatible GET /v1/models and POST /v1/embeddings, so stock OpenAI clients can use the same models.

Served names are the MODEL_NAME settings of the enabled slots. /v1/embeddings accepts the text embedding
model's name and, when enabled, the multimodal model's name (its text embeddings); an unknown name is 404 and the
reranker's name 422. `encoding_format=base64` returns each vector as base64 of its little-endian float32 bytes,
as OpenAI does. `usage` counts tokens where the provider can (its `count_tokens`), else reports 0.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from backend.api.deps import AUTH, ServicesDep
from backend.api.schemas import (
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIModel,
    OpenAIModelList,
    RequestLimits,
    check_dimensions,
    ensure_finite,
    finite_rows,
)
from backend.api.state import Services
from backend.errors import InvalidRequestError, NotFoundError
from backend.providers.base import BaseEmbeddingProvider

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=AUTH)
_STARTED = int(time.time())


def served_models(services: Services) -> dict[str, tuple[str, object]]:
    """Served name -> (slot, provider) for every enabled slot; the text embedding model wins a name clash."""
    settings = services.settings
    slots = [
        ("embedding", settings.embedding.model_name, services.embedding),
        ("reranker", settings.reranker.model_name, services.reranker),
        ("multimodal", settings.multimodal.model_name, services.multimodal),
    ]
    served: dict[str, tuple[str, object]] = {}
    for slot, name, provider in slots:
        if provider is not None:
            served.setdefault(name, (slot, provider))
    return served


@router.get("/models", response_model=OpenAIModelList)
async def list_models(services: ServicesDep) -> OpenAIModelList:
    """The served model names (the `model` to send to /v1/embeddings and /v1/rerank)."""
    owners = {
        "embedding": services.settings.embedding.provider.value,
        "reranker": services.settings.reranker.provider.value,
        "multimodal": services.settings.multimodal.provider.value,
    }
    return OpenAIModelList(
        data=[
            OpenAIModel(id=name, created=_STARTED, owned_by=owners[slot])
            for name, (slot, _) in served_models(services).items()
        ]
    )


def _limited(body: OpenAIEmbeddingRequest, services: ServicesDep) -> OpenAIEmbeddingRequest:
    RequestLimits.from_settings(services.settings).check_items("input", body.texts)
    return body


def _embedder_for(model: str, services: Services) -> BaseEmbeddingProvider:
    served = served_models(services)
    if model not in served:
        raise NotFoundError(f"model '{model}' is not served here; GET /v1/models lists {sorted(served)}", model=model)
    slot, provider = served[model]
    if not isinstance(provider, BaseEmbeddingProvider):
        embedders = sorted(name for name, (_, p) in served.items() if isinstance(p, BaseEmbeddingProvider))
        raise InvalidRequestError(
            f"model '{model}' is the {slot}, not an embedding model; /v1/embeddings serves {embedders}", model=model
        )
    return provider


def _encode(vectors: np.ndarray, encoding_format: str) -> list:
    if encoding_format == "float":
        return finite_rows(vectors)
    ensure_finite(vectors)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors.astype("<f4", copy=False)]


@router.post("/embeddings", response_model=OpenAIEmbeddingResponse)
async def create_embeddings(
    body: Annotated[OpenAIEmbeddingRequest, Depends(_limited)], services: ServicesDep
) -> JSONResponse:
    """OpenAI embeddings: {input, model, encoding_format, dimensions} -> {data: [{index, embedding}], usage}."""
    provider = _embedder_for(body.model, services)
    check_dimensions(body.dimensions, provider)
    texts = body.texts
    vectors = await provider.embed(texts, input_type="document", dimensions=body.dimensions)
    tokens = await provider.count_tokens(texts) or 0
    data = [
        {"object": "embedding", "index": i, "embedding": row}
        for i, row in enumerate(_encode(vectors, body.encoding_format))
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})
