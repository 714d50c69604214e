"""GET /api/health: whether the backend is ready, and what each model slot runs.

Open without the API key (so load balancers and probes can call it); it shows no secrets, only each provider's
type, model, device, dtype, dimension and memory where known. 200 when ready, 503 while starting or stopping.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from backend.api.schemas import HealthResponse
from backend.api.state import Services

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        return JSONResponse(status_code=503, content=HealthResponse(status="starting").model_dump())
    slots = {"embedding": services.embedding, "reranker": services.reranker, "multimodal": services.multimodal}
    providers = {
        name: ({"enabled": True, **provider.info().as_dict()} if provider is not None else {"enabled": False})
        for name, provider in slots.items()
    }
    store = services.rag.info() if services.rag is not None else None
    body = HealthResponse(status="ok", providers=providers, store=store)
    return JSONResponse(content=body.model_dump(mode="json"))
