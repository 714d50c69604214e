"""Optional answer writer: an OpenAI-compatible chat model (LLM_BASE_URL, LLM_MODEL, LLM_API_KEY) over httpx.

Without LLM settings the RAG service returns retrieval results only; nothing here is constructed.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from backend.config import LLMConfig
from backend.errors import ConfigurationError, UpstreamError

SYSTEM_PROMPT = (
    "You answer questions using only the numbered context passages you are given. Cite the passages you use "
    "as [1], [2], ... right after the statement they support. If the passages do not contain the answer, say "
    "that you do not know."
)


def build_messages(question: str, contexts: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages: the system rule, then the numbered passages and the question."""
    numbered = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(contexts, start=1))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Context passages:\n\n{numbered}\n\nQuestion: {question}"},
    ]


class ChatLLM:
    """`await answer(question, contexts)` -> the model's answer citing the contexts as [n]."""

    def __init__(self, config: LLMConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not config.enabled:
            raise ConfigurationError("The LLM needs LLM_BASE_URL and LLM_MODEL")
        self.model = str(config.model)
        self.url = str(config.base_url).rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        self._client = httpx.AsyncClient(timeout=config.request_timeout, headers=headers, transport=transport)

    async def answer(self, question: str, contexts: Sequence[str]) -> str:
        """One chat completion; UpstreamError (HTTP 502) with the upstream status and message on failure."""
        payload = {"model": self.model, "messages": build_messages(question, contexts), "temperature": 0}
        try:
            response = await self._client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"LLM request to {self.url} failed: {exc!r}", provider="llm") from exc
        if response.status_code != 200:
            raise UpstreamError(
                f"LLM at {self.url} answered HTTP {response.status_code}: {response.text[:500]}",
                provider="llm", upstream_status=response.status_code,
            )
        try:
            return str(response.json()["choices"][0]["message"]["content"]).strip()
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamError(f"LLM at {self.url} returned an unexpected body: {response.text[:500]}",
                                provider="llm", upstream_status=response.status_code) from exc

    async def close(self) -> None:
        await self._client.aclose()
