"""The one place where errors become HTTP responses.

Body shape: {"error": {"code": ..., "message": ..., **details}}. 4xx for the caller's mistakes, 429 for overload,
503 while not ready, 502 for upstream failures, 500 (logged with traceback) for our own bugs.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from backend.errors import BackendError

logger = logging.getLogger(__name__)


def _body(code: str, message: str, **details: object) -> dict:
    return {"error": {"code": code, "message": message, **details}}


async def _backend_error(request: Request, exc: BackendError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(
        status_code=exc.status_code,
        content=jsonable_encoder(_body(exc.code, exc.message, **exc.details)),
        headers=headers,
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {str(error.get('msg')).removeprefix('Value error, ')}")
    return JSONResponse(
        status_code=422,
        content=jsonable_encoder(_body("invalid_request", "; ".join(problems), errors=exc.errors())),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed unexpectedly", request.method, request.url.path)
    return JSONResponse(status_code=500, content=_body("internal_error", "Internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BackendError, _backend_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
