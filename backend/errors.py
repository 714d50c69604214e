"""The one error hierarchy of the backend.

Library code raises these; `backend.api.error_handlers` maps them to HTTP in one place via `status_code`.
Messages are written for the caller: they name the limit or setting involved and the value received.
"""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    """Base of every error the backend raises on purpose. `status_code` is the HTTP status it maps to."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


# --- the caller's mistakes (4xx) ---------------------------------------------------------------------------
class InvalidRequestError(BackendError, ValueError):
    """The request is malformed or breaks a limit (HTTP 422)."""

    status_code = 422
    code = "invalid_request"


class InvalidInputTypeError(InvalidRequestError, TypeError):
    """An input has the wrong type, e.g. a non-string where text is expected (HTTP 422; also a TypeError)."""

    code = "invalid_input_type"


class InvalidImageError(InvalidRequestError):
    """An image cannot be used: undecodable, empty, too large, unreadable path, URL not allowed (HTTP 422)."""

    code = "invalid_image"


class AuthenticationError(BackendError):
    """Missing or wrong bearer API key (HTTP 401)."""

    status_code = 401
    code = "unauthorized"


class NotFoundError(BackendError):
    """The named resource does not exist (HTTP 404)."""

    status_code = 404
    code = "not_found"


class ProviderDisabledError(BackendError):
    """The route needs a model that this deployment has switched off (HTTP 404), e.g. RERANKER_ENABLED=false."""

    status_code = 404
    code = "provider_disabled"


class OverloadedError(BackendError):
    """The request queue is full (HTTP 429): refuse now rather than let clients wait without bound."""

    status_code = 429
    code = "overloaded"


# --- our side (5xx) ----------------------------------------------------------------------------------------
class NotReadyError(BackendError):
    """The service is starting, shutting down or unhealthy (HTTP 503)."""

    status_code = 503
    code = "not_ready"


class ShuttingDownError(NotReadyError):
    """Work submitted after shutdown began (HTTP 503)."""

    code = "shutting_down"


class StoreUnavailableError(BackendError):
    """The vector store cannot be reached or refused the operation (HTTP 503, with the cause)."""

    status_code = 503
    code = "store_unavailable"


class UpstreamError(BackendError):
    """An online provider failed (HTTP 502). Carries the upstream status and message."""

    status_code = 502
    code = "upstream_error"

    def __init__(self, message: str, *, provider: str, upstream_status: int | None = None, **details: Any) -> None:
        super().__init__(message, provider=provider, upstream_status=upstream_status, **details)
        self.provider = provider
        self.upstream_status = upstream_status


class ModelExecutionError(BackendError):
    """A forward pass failed (HTTP 500): a CUDA error, an out-of-memory. Fails only the batch it happened in."""

    code = "model_error"


class NonFiniteOutputError(ModelExecutionError):
    """A model produced NaN or Inf (fp16 overflow is the usual cause). Never replaced silently."""

    code = "non_finite_output"


class ConfigurationError(BackendError):
    """A setting is invalid or does not fit the machine (raised at start-up; names the variable and the value)."""

    code = "configuration_error"


class DeviceError(ConfigurationError):
    """The configured device, dtype or attention kernel cannot run here (raised at start-up with the fix)."""

    code = "device_error"
