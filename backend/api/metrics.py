"""Prometheus metrics: HTTP requests, latency and errors per route, and GET /metrics.

Labels use the route template (`/api/embed`, not the raw path) so label values stay few; requests that match no
route are counted under route="unmatched". /metrics serves prometheus-client's default registry, so metrics
that other modules register there (the batcher's queue and batch figures) appear next to these. It is open
without the API key, like /api/health: scrapers rarely carry one, and it shows counts and timings only.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; from a cached single query (~5 ms) to a bulk embedding request on a busy GPU (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNMATCHED = "unmatched"

REQUESTS = Counter(
    "backend_http_requests_total",
    "HTTP requests answered, by route template and status",
    ["method", "route", "status"],
)
ERRORS = Counter(
    "backend_http_request_errors_total",
    "HTTP requests answered with status >= 400 (or that raised), by route template and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "backend_http_request_duration_seconds",
    "Time from request to the end of the response, by route template",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering) that records every HTTP request once it has been answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # stays 500 when the app raises before it starts a response
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            _record(scope, status, time.perf_counter() - started)


def _record(scope: Scope, status: int, seconds: float) -> None:
    route: Any = scope.get("route")
    template = getattr(route, "path", None) or UNMATCHED
    method = scope.get("method", "")
    REQUESTS.labels(method, template, str(status)).inc()
    LATENCY.labels(method, template).observe(seconds)
    if status >= 400:
        ERRORS.labels(method, template, str(status)).inc()


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus text exposition of the default registry."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> None:
    """Add the middleware and the /metrics route to `app`."""
    app.add_middleware(MetricsMiddleware)
    app.include_router(router)
