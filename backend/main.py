"""The FastAPI app: `uvicorn backend.main:app` (or scripts/start_backend.sh).

The lifespan builds the configured providers through ModelFactory, warms them up (so a misfit shows at boot, not
under load), and closes them on shutdown. Tests pass ready-made `Services` to `create_app`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backend.api.error_handlers import install_error_handlers
from backend.api.metrics import install_metrics
from backend.api.routes import ROUTERS
from backend.api.state import Services
from backend.config import Settings
from backend.services import model_factory
from backend.services.rag_service import RAGService

logger = logging.getLogger(__name__)


async def build_services(settings: Settings) -> Services:
    """Build and warm up every configured provider; on failure close what was built and re-raise."""
    services = Services(settings=settings, embedding=model_factory.create_embedding_provider(settings.embedding))
    try:
        services.reranker = model_factory.create_reranker(settings.reranker)
        services.multimodal = model_factory.create_multimodal_provider(settings.multimodal)
        for provider in (services.embedding, services.reranker, services.multimodal):
            if provider is not None:
                await provider.warmup()
                logger.info("ready: %s", provider.info().as_dict())
        # After the providers: the store's dimensions come from them (and Services.close closes it first).
        services.rag = await RAGService.create(
            settings, services.embedding, reranker=services.reranker, multimodal=services.multimodal
        )
    except BaseException:
        await services.close()
        raise
    return services


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """App factory. With `services` given, the app uses them as they are and does not close them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        state = services if services is not None else await build_services(settings or Settings.load())
        app.state.services = state
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            if owned:
                await state.close()

    app = FastAPI(title="RAG backend (local GPU models)", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings or (services.settings if services is not None else None)
    install_error_handlers(app)
    install_metrics(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _app_from_environment() -> FastAPI:
    settings = Settings.load()
    logging.basicConfig(level=settings.backend.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn backend.main:app` reads settings only when the server asks for the app, not on import.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(name)
