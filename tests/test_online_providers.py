"""The OpenAI-compatible and Jina providers against a loopback HTTP server that speaks their wire formats."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from backend.errors import ConfigurationError, InvalidRequestError, UpstreamError
from backend.providers.jina import JinaEmbeddingProvider, JinaRerankerProvider
from backend.providers.openai_compat import OpenAICompatibleEmbeddingProvider
from tests.fakes import fake_vector, make_settings

KEY = "sk-loopback-secret"


@dataclass
class Upstream:
    """State of the fake API: what it received, and scripted answers that take precedence over normal ones."""

    port: int = 0
    native_dim: int = 48
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    scripted: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.requests.append({"path": path, "headers": headers, "body": body})
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.scripted:
            return self.scripted.pop(0)
        if headers.get("authorization") != f"Bearer {KEY}":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, {}
        if path == "/v1/embeddings":
            return 200, self._embeddings(body), {}
        if path == "/v1/rerank":
            return 200, self._rerank(body), {}
        return 404, {"detail": "Not Found"}, {}

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        width = body.get("dimensions", self.native_dim)
        data = [
            {"object": "embedding", "index": i, "embedding": expected_vector(text, width, body.get("task")).tolist()}
            for i, text in enumerate(body["input"])
        ]
        # Reversed on purpose: clients must order by `index`, not by position.
        return {"object": "list", "data": data[::-1], "model": body["model"], "usage": {"total_tokens": len(data)}}

    def _rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        scores = word_overlap(body["query"], body["documents"])
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.get("top_n")]
        results = [{"index": i, "relevance_score": scores[i]} for i in order]
        if body.get("return_documents", True):
            for result in results:
                result["document"] = {"text": body["documents"][result["index"]]}
        return {"model": body["model"], "results": results, "usage": {"total_tokens": 1}}


def expected_vector(text: str, width: int, task: str | None = None) -> np.ndarray:
    return fake_vector(f"{task}|{text}", width)


def word_overlap(query: str, documents: list[str]) -> list[float]:
    words = set(query.split())
    return [len(words & set(doc.split())) / len(words) for doc in documents]


class _Handler(BaseHTTPRequestHandler):
    upstream: Upstream

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, answer, extra_headers = self.upstream.answer(self.path, headers, body)
        payload = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra_headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ThreadingHTTPServer, Upstream]]:
    upstream = Upstream()
    handler = type("Handler", (_Handler,), {"upstream": upstream})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    upstream.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, upstream
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def upstream(server: tuple[ThreadingHTTPServer, Upstream]) -> Upstream:
    state = server[1]
    state.requests.clear()
    state.scripted.clear()
    state.delay_s = 0.0
    return state


def openai_provider(upstream: Upstream, **fields: Any) -> OpenAICompatibleEmbeddingProvider:
    config = {"provider": "openai", "base_url": upstream.base_url, "api_key": KEY, "model_name": "text-emb", **fields}
    return OpenAICompatibleEmbeddingProvider(make_settings(embedding=config).embedding)


def jina_settings(upstream: Upstream, **fields: Any):
    config = {"provider": "jina", "base_url": upstream.base_url, "api_key": KEY, **fields}
    return make_settings(embedding={"model_name": "jina-embeddings-v3", **config},
                         reranker={"enabled": True, "model_name": "jina-reranker-v2", **config})


# --- OpenAI-compatible embeddings --------------------------------------------------------------------------
async def test_openai_embeds_in_chunks_ordered_by_index(upstream: Upstream) -> None:
    provider = openai_provider(upstream, api_batch_size=2)
    texts = [f"text number {i}" for i in range(5)]
    vectors = await provider.embed(texts)
    await provider.close()
    assert vectors.dtype == np.float32 and vectors.shape == (5, 48)
    np.testing.assert_allclose(vectors, np.stack([expected_vector(t, 48) for t in texts]), rtol=1e-6)
    assert [len(r["body"]["input"]) for r in upstream.requests] == [2, 2, 1]
    first = upstream.requests[0]
    assert first["path"] == "/v1/embeddings"
    assert first["headers"]["authorization"] == f"Bearer {KEY}"
    assert first["body"] == {"model": "text-emb", "input": texts[:2], "encoding_format": "float"}


async def test_openai_dimensions_from_settings_and_per_call(upstream: Upstream) -> None:
    provider = openai_provider(upstream, embedding_dim=32)
    assert provider.embedding_dim == 32
    assert (await provider.embed(["a", "b"])).shape == (2, 32)
    assert (await provider.embed(["a"], dimensions=40)).shape == (1, 40)
    assert [r["body"]["dimensions"] for r in upstream.requests] == [32, 40]
    await provider.close()


async def test_openai_empty_input_makes_no_call(upstream: Upstream) -> None:
    provider = openai_provider(upstream, embedding_dim=32)
    empty = await provider.embed([])
    await provider.close()
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert upstream.requests == []


async def test_openai_warmup_probes_the_width(upstream: Upstream) -> None:
    provider = openai_provider(upstream)
    assert provider.info().dimension is None
    await provider.warmup()
    await provider.close()
    assert provider.embedding_dim == 48 and provider.info().dimension == 48
    assert len(upstream.requests) == 1


async def test_openai_refuses_an_instruction_instead_of_dropping_it(upstream: Upstream) -> None:
    provider = openai_provider(upstream)
    with pytest.raises(InvalidRequestError, match="takes no instruction"):
        await provider.embed(["q"], input_type="query", instruction="Find passages")
    await provider.close()
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("status", "answer", "message"),
    [
        (400, {"error": {"message": "input is too long", "type": "invalid_request_error"}}, "input is too long"),
        (404, {"detail": "model not found"}, "model not found"),
        (500, "upstream exploded", "upstream exploded"),
        (502, {"message": "bad gateway upstream"}, "bad gateway upstream"),
    ],
)
async def test_upstream_errors_carry_status_and_message(upstream: Upstream, status: int, answer: Any, message: str):
    upstream.scripted.append((status, answer, {}))
    provider = openai_provider(upstream)
    with pytest.raises(UpstreamError) as caught:
        await provider.embed(["x"])
    await provider.close()
    error = caught.value
    assert error.status_code == 502 and error.upstream_status == status and error.provider == "openai"
    assert message in error.message and f"HTTP {status}" in error.message
    assert len(upstream.requests) == 1  # not retried


async def test_wrong_key_is_an_upstream_401(upstream: Upstream) -> None:
    provider = openai_provider(upstream, api_key="sk-wrong")
    with pytest.raises(UpstreamError, match="Incorrect API key provided") as caught:
        await provider.embed(["x"])
    await provider.close()
    assert caught.value.upstream_status == 401
    assert "sk-wrong" not in caught.value.message


async def test_malformed_answers_are_upstream_errors(upstream: Upstream) -> None:
    provider = openai_provider(upstream)
    upstream.scripted.append((200, {"data": [{"index": 0, "embedding": [0.1, 0.2]}]}, {}))
    with pytest.raises(UpstreamError, match="answered 1 embeddings .* for 2 inputs"):
        await provider.embed(["a", "b"])
    upstream.scripted.append((200, "<html>maintenance</html>", {}))
    with pytest.raises(UpstreamError, match="not JSON"):
        await provider.embed(["a"])
    await provider.close()


async def test_timeout_is_an_upstream_error(upstream: Upstream) -> None:
    upstream.delay_s = 1.0
    provider = openai_provider(upstream, request_timeout=0.2)
    started = time.perf_counter()
    with pytest.raises(UpstreamError, match=r"did not answer within 0.2 s") as caught:
        await provider.embed(["slow"])
    await provider.close()
    assert caught.value.upstream_status is None
    assert time.perf_counter() - started < 1.0


async def test_unreachable_server_is_an_upstream_error() -> None:
    with socket.socket() as sock:  # a port that nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = {"provider": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": KEY}
    provider = OpenAICompatibleEmbeddingProvider(make_settings(embedding=config).embedding)
    with pytest.raises(UpstreamError, match="could not be reached"):
        await provider.embed(["x"])
    await provider.close()


async def test_429_and_503_are_retried_a_bounded_number_of_times(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    provider = openai_provider(upstream, max_retries=2, retry_backoff=0.01)
    upstream.scripted += [(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}), (503, "busy", {})]
    with caplog.at_level(logging.WARNING, logger="backend.providers.http_client"):
        vectors = await provider.embed(["a"])
    assert vectors.shape == (1, 48) and len(upstream.requests) == 3
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "429 (rate limited)" in retries[0] and "retry 2 of 2" in retries[1]
    assert KEY not in caplog.text

    upstream.requests.clear()
    upstream.scripted += [(503, "busy", {})] * 3 + [(200, {"never": "reached"}, {})]
    with pytest.raises(UpstreamError) as caught:
        await provider.embed(["a"])
    await provider.close()
    assert caught.value.upstream_status == 503 and len(upstream.requests) == 3
    upstream.scripted.clear()


async def test_info_shows_no_secret(upstream: Upstream) -> None:
    provider = openai_provider(upstream, embedding_dim=32)
    shown = json.dumps(provider.info().as_dict()) + repr(provider._client)
    await provider.close()
    assert KEY not in shown and upstream.base_url in shown


# --- Jina --------------------------------------------------------------------------------------------------
async def test_jina_embeddings_send_the_task_of_the_input_type(upstream: Upstream) -> None:
    provider = JinaEmbeddingProvider(jina_settings(upstream).embedding)
    queries = await provider.embed(["what is milvus"], input_type="query")
    documents = await provider.embed(["milvus is a vector store", "another"], dimensions=32)
    await provider.close()
    np.testing.assert_allclose(queries[0], expected_vector("what is milvus", 48, "retrieval.query"), rtol=1e-6)
    np.testing.assert_allclose(documents[1], expected_vector("another", 32, "retrieval.passage"), rtol=1e-6)
    bodies = [r["body"] for r in upstream.requests]
    assert bodies[0] == {
        "model": "jina-embeddings-v3",
        "input": ["what is milvus"],
        "task": "retrieval.query",
        "normalized": True,
        "embedding_type": "float",
    }
    assert bodies[1]["task"] == "retrieval.passage" and bodies[1]["dimensions"] == 32


async def test_jina_rerank_scores_in_input_order_across_chunks(upstream: Upstream) -> None:
    reranker = JinaRerankerProvider(jina_settings(upstream, api_batch_size=2).reranker)
    documents = ["nothing here", "milvus vector", "vector store milvus", "store", "milvus"]
    scores = await reranker.rerank("milvus vector store", documents)
    assert scores == pytest.approx(word_overlap("milvus vector store", documents))
    bodies = [r["body"] for r in upstream.requests]
    assert [r["path"] for r in upstream.requests] == ["/v1/rerank"] * 3
    assert [b["documents"] for b in bodies] == [documents[0:2], documents[2:4], documents[4:]]
    assert all(b["top_n"] == len(b["documents"]) and b["return_documents"] is False for b in bodies)
    assert await reranker.rerank("q", []) == [] and len(upstream.requests) == 3
    with pytest.raises(InvalidRequestError, match="takes no instruction"):
        await reranker.rerank("q", ["d"], instruction="judge")
    await reranker.close()


async def test_jina_rerank_errors(upstream: Upstream) -> None:
    reranker = JinaRerankerProvider(jina_settings(upstream).reranker)
    upstream.scripted.append((422, {"detail": "documents must not be empty strings"}, {}))
    with pytest.raises(UpstreamError, match="documents must not be empty strings") as caught:
        await reranker.rerank("q", [""])
    assert caught.value.upstream_status == 422 and caught.value.provider == "jina"
    upstream.scripted.append((200, {"results": [{"index": 0, "relevance_score": 0.5}]}, {}))
    with pytest.raises(UpstreamError, match="1 rerank results for 2 documents"):
        await reranker.rerank("q", ["a", "b"])
    await reranker.close()


def test_jina_needs_a_key() -> None:
    settings = make_settings(embedding={"provider": "jina"}, reranker={"enabled": True, "provider": "jina"})
    with pytest.raises(ConfigurationError, match="EMBEDDING_API_KEY is required"):
        JinaEmbeddingProvider(settings.embedding)
    with pytest.raises(ConfigurationError, match="RERANKER_API_KEY is required"):
        JinaRerankerProvider(settings.reranker)
