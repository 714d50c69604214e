"""POST /api/embed/multimodal: texts, images and text+image pairs -> vectors in GME's one space."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictStr, model_validator

from backend.api.deps import AUTH, MultimodalDep, ServicesDep
from backend.api.schemas import RequestLimits, api_image, finite_rows
from backend.errors import InvalidRequestError
from backend.providers.base import InputType

router = APIRouter(prefix="/api", tags=["multimodal"], dependencies=AUTH)

IMAGE_DOC = (
    "base64 or a data URI (data:image/png;base64,...); http(s) URLs only when MULTIMODAL_EMBEDDING_ALLOW_IMAGE_URLS"
)


class ImageTextPair(BaseModel):
    text: StrictStr
    image: StrictStr = Field(description=IMAGE_DOC)


class MultimodalEmbedRequest(BaseModel):
    texts: list[StrictStr] | None = Field(None, description="Texts alone")
    images: list[StrictStr] | None = Field(None, description=f"Images alone: {IMAGE_DOC}")
    pairs: list[ImageTextPair] | None = Field(None, description="Text+image pairs, one fused vector each")
    input_type: InputType = Field(
        "document", description="query: the query instruction applies; document: GME's default instruction"
    )
    instruction: str | None = Field(None, description="Overrides MULTIMODAL_EMBEDDING_INSTRUCTION for queries")

    @model_validator(mode="after")
    def _something(self) -> MultimodalEmbedRequest:
        if not (self.texts or self.images or self.pairs):
            raise ValueError("send at least one of texts, images or pairs (non-empty)")
        return self


class MultimodalEmbedResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="Rows in request order: texts, then images, then pairs")
    dimension: int
    model: str


def _limited(body: MultimodalEmbedRequest, services: ServicesDep) -> MultimodalEmbedRequest:
    limits = RequestLimits.from_settings(services.settings)
    count = len(body.texts or []) + len(body.images or []) + len(body.pairs or [])
    if count > limits.max_items:
        raise InvalidRequestError(
            f"the request has {count} inputs; the limit is {limits.max_items} (BACKEND_MAX_ITEMS_PER_REQUEST)",
            limit=limits.max_items,
            received=count,
            variable="BACKEND_MAX_ITEMS_PER_REQUEST",
        )
    for i, text in enumerate(body.texts or []):
        limits.check_text(f"texts[{i}]", text)
    for i, pair in enumerate(body.pairs or []):
        limits.check_text(f"pairs[{i}].text", pair.text)
    return body


@router.post("/embed/multimodal", response_model=MultimodalEmbedResponse)
async def embed_multimodal(
    body: Annotated[MultimodalEmbedRequest, Depends(_limited)], provider: MultimodalDep, services: ServicesDep
) -> JSONResponse:
    """Embed texts, images and pairs with GME; 422 names a bad image (its index and the problem) or a limit."""
    options = {"input_type": body.input_type, "instruction": body.instruction}
    jobs = []
    if body.texts:
        jobs.append(provider.embed(body.texts, **options))
    if body.images:
        jobs.append(provider.embed_images([api_image(image) for image in body.images], **options))
    if body.pairs:
        texts = [pair.text for pair in body.pairs]
        jobs.append(provider.embed_fused(texts, [api_image(pair.image) for pair in body.pairs], **options))
    vectors = np.concatenate(await asyncio.gather(*jobs))
    return JSONResponse(
        {
            "embeddings": finite_rows(vectors),
            "dimension": int(vectors.shape[1]),
            "model": services.settings.multimodal.model_name,
        }
    )
