"""The HTTP client shared by the online providers: timeouts, a bounded logged retry, upstream errors mapped.

Every failure of an online API becomes an `UpstreamError` (HTTP 502 for our callers) carrying the upstream
status and message: 4xx/5xx answers, timeouts, refused connections, answers that are not JSON. Only 429 and 503
are retried, at most `max_retries` times, each retry logged; nothing is swallowed. The API key goes into the
Authorization header and nowhere else (never into logs, errors or `repr`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from pydantic import SecretStr

from backend.errors import UpstreamError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
# Longest upstream error text we repeat to our callers (bodies can be whole HTML pages).
MAX_MESSAGE_CHARS = 500


class UpstreamClient:
    """JSON-over-HTTP client for one online provider.

    `base_url` is the API root (e.g. "https://api.openai.com/v1"); `post_json("embeddings", ...)` posts to
    "<base_url>/embeddings". Retries on 429/503 wait `retry_backoff * 2**attempt` seconds, or the upstream's
    `Retry-After` when it sends one (capped at `timeout`).
    """

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        api_key: SecretStr | None,
        timeout: float,
        max_retries: int,
        retry_backoff: float,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        headers = {"Accept": "application/json"}
        if api_key is not None and api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(base_url=self.base_url + "/", headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"UpstreamClient(provider={self.provider!r}, base_url={self.public_url!r})"

    @property
    def public_url(self) -> str:
        """The base URL without any user:password part, safe to show in /api/health and logs."""
        return str(httpx.URL(self.base_url).copy_with(username=None, password=None))

    async def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        """POST `payload` as JSON to `<base_url>/<path>` and return the decoded JSON answer.

        Raises UpstreamError (with `upstream_status` when the upstream answered) on any failure.
        """
        url = path.lstrip("/")
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._client.post(url, json=payload)
            except httpx.TimeoutException as exc:
                raise UpstreamError(
                    f"{self.provider} did not answer within {self.timeout} s ({type(exc).__name__}) at "
                    f"{self.public_url}/{url}",
                    provider=self.provider,
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"{self.provider} could not be reached at {self.public_url}/{url}: {type(exc).__name__}: {exc}",
                    provider=self.provider,
                ) from exc
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                wait = self._retry_wait(response, attempt)
                logger.warning(
                    "%s answered %d (%s) at %s; retry %d of %d in %.2f s",
                    self.provider,
                    response.status_code,
                    _upstream_message(response),
                    url,
                    attempt + 1,
                    self.max_retries,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            return self._decode(response, url)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float:
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.timeout)
            except ValueError:  # an HTTP date: fall back to our own backoff
                pass
        return min(self.retry_backoff * 2**attempt, self.timeout)

    def _decode(self, response: httpx.Response, url: str) -> Any:
        if response.status_code >= 400:
            raise UpstreamError(
                f"{self.provider} answered HTTP {response.status_code} at {self.public_url}/{url}: "
                f"{_upstream_message(response)}",
                provider=self.provider,
                upstream_status=response.status_code,
                upstream_message=_upstream_message(response),
            )
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(
                f"{self.provider} answered HTTP {response.status_code} at {self.public_url}/{url} with a body that "
                f"is not JSON: {response.text[:MAX_MESSAGE_CHARS]!r}",
                provider=self.provider,
                upstream_status=response.status_code,
            ) from exc

    async def close(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._client.aclose()


def _upstream_message(response: httpx.Response) -> str:
    """The error text of an upstream answer: OpenAI's error.message, Jina's detail, or the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:MAX_MESSAGE_CHARS] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:MAX_MESSAGE_CHARS]
        for key in ("detail", "message", "error"):
            if body.get(key):
                return str(body[key])[:MAX_MESSAGE_CHARS]
    return str(body)[:MAX_MESSAGE_CHARS]
