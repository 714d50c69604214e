"""POST /api/embed: texts -> vectors from the configured embedding provider."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from backend.api.deps import AUTH, EmbeddingDep, ServicesDep
from backend.api.schemas import EmbedRequest, EmbedResponse, RequestLimits, check_dimensions, finite_rows

router = APIRouter(prefix="/api", tags=["embeddings"], dependencies=AUTH)


def _limited(body: EmbedRequest, services: ServicesDep) -> EmbedRequest:
    RequestLimits.from_settings(services.settings).check_items("texts", body.texts)
    return body


@router.post("/embed", response_model=EmbedResponse)
async def embed(
    body: Annotated[EmbedRequest, Depends(_limited)], provider: EmbeddingDep, services: ServicesDep
) -> JSONResponse:
    """Embed `texts`; row i of `embeddings` belongs to texts[i]. 422 names any limit broken and the value sent."""
    check_dimensions(body.dimensions, provider)
    vectors = await provider.embed(
        body.texts, input_type=body.input_type, instruction=body.instruction, dimensions=body.dimensions
    )
    # A plain JSONResponse: re-validating millions of floats through the response model would cost seconds.
    return JSONResponse(
        {
            "embeddings": finite_rows(vectors),
            "dimension": int(vectors.shape[1]),
            "model": services.settings.embedding.model_name,
        }
    )
