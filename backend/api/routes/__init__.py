"""Thin route modules; each exports `router`. ROUTERS is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.routes import documents, embeddings, health, multimodal, openai_v1, rerank

ROUTERS: list[APIRouter] = [
    health.router,
    embeddings.router,
    rerank.router,
    multimodal.router,
    openai_v1.router,
    documents.router,
]
