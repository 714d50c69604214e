"""POST /api/rerank and the Cohere/Jina-compatible POST /v1/rerank: documents sorted by relevance to a query."""

from __future__ import annotations

import math
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends

from backend.api.deps import AUTH, RerankerDep, ServicesDep
from backend.api.schemas import (
    CompatRerankDocument,
    CompatRerankRequest,
    CompatRerankResponse,
    CompatRerankResult,
    RequestLimits,
    RerankRequest,
    RerankResponse,
    RerankResult,
)
from backend.errors import ModelExecutionError, NotFoundError
from backend.providers.base import BaseRerankerProvider

router = APIRouter(tags=["rerank"], dependencies=AUTH)


def _limited(body: RerankRequest, services: ServicesDep) -> RerankRequest:
    RequestLimits.from_settings(services.settings).check_documents(body.query, body.documents)
    return body


def _limited_compat(body: CompatRerankRequest, services: ServicesDep) -> CompatRerankRequest:
    served = services.settings.reranker.model_name
    if body.model is not None and body.model != served and services.reranker is not None:
        raise NotFoundError(f"model '{body.model}' is not served here; the reranker is '{served}'", model=body.model)
    RequestLimits.from_settings(services.settings).check_documents(body.query, body.documents)
    return body


async def _ranked(reranker: BaseRerankerProvider, body: RerankRequest) -> list[tuple[int, float]]:
    """(index, score) best first (ties keep input order), cut to top_n."""
    scores = await reranker.rerank(body.query, body.documents, instruction=body.instruction)
    if len(scores) != len(body.documents) or not all(math.isfinite(score) for score in scores):
        raise ModelExecutionError(
            f"The reranker returned {len(scores)} scores for {len(body.documents)} documents, or a NaN/Inf"
        )
    ranked = sorted(enumerate(scores), key=lambda pair: -pair[1])
    return ranked[: body.top_n] if body.top_n is not None else ranked


@router.post("/api/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(
    body: Annotated[RerankRequest, Depends(_limited)], reranker: RerankerDep, services: ServicesDep
) -> RerankResponse:
    """Score `documents` against `query`; results carry the document's `index` and are sorted best first."""
    results = [
        RerankResult(
            index=index, relevance_score=score, document=body.documents[index] if body.return_documents else None
        )
        for index, score in await _ranked(reranker, body)
    ]
    return RerankResponse(model=services.settings.reranker.model_name, results=results)


@router.post("/v1/rerank", response_model=CompatRerankResponse, response_model_exclude_none=True)
async def rerank_compat(
    body: Annotated[CompatRerankRequest, Depends(_limited_compat)], reranker: RerankerDep, services: ServicesDep
) -> CompatRerankResponse:
    """Cohere / Jina rerank: {query, documents, top_n, return_documents} -> {results: [{index, relevance_score}]}."""
    results = [
        CompatRerankResult(
            index=index,
            relevance_score=score,
            document=CompatRerankDocument(text=body.documents[index]) if body.return_documents else None,
        )
        for index, score in await _ranked(reranker, body)
    ]
    return CompatRerankResponse(id=str(uuid.uuid4()), model=services.settings.reranker.model_name, results=results)
