"""The HTTP API over deterministic fake providers: every route's success path, limits, auth, errors, metrics."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.api.state import Services
from backend.errors import UpstreamError
from backend.main import create_app
from tests.fakes import FakeEmbeddingProvider, FakeMultimodalProvider, FakeRerankerProvider, make_services

LIMITS = {"backend": {"max_items_per_request": 10, "max_chars_per_item": 30}, "reranker": {"max_documents": 3}}
API_KEY = "backend-secret-key"


def client_for(services: Services) -> TestClient:
    return TestClient(create_app(services=services), raise_server_exceptions=False)


@pytest.fixture
def services() -> Services:
    return make_services(
        embedding=FakeEmbeddingProvider(dim=8),
        reranker=FakeRerankerProvider(),
        multimodal=FakeMultimodalProvider(dim=16),
        overrides=LIMITS,
    )


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with client_for(services) as client:
        yield client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --- health ------------------------------------------------------------------------------------------------
def test_health_lists_each_slot(client: TestClient) -> None:
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["providers"]["embedding"] == {
        "enabled": True, "provider": "fake", "model": "fake-embedding", "dimension": 8, "device": "cpu",
        "dtype": "float32",
    }
    assert body["providers"]["reranker"]["model"] == "fake-reranker"
    assert body["providers"]["multimodal"]["dimension"] == 16


def test_health_is_503_until_started_and_shows_disabled_slots() -> None:
    services = make_services()
    unstarted = client_for(services)  # no `with`: the lifespan has not run
    assert unstarted.get("/api/health").status_code == 503
    assert unstarted.get("/api/health").json()["status"] == "starting"
    assert error_of(unstarted.post("/api/embed", json={"texts": ["a"]}), 503)["code"] == "not_ready"
    with client_for(services) as client:
        providers = client.get("/api/health").json()["providers"]
    assert providers["reranker"] == {"enabled": False} and providers["multimodal"] == {"enabled": False}


# --- /api/embed --------------------------------------------------------------------------------------------
def test_embed_returns_the_provider_vectors(client: TestClient, services: Services) -> None:
    response = client.post(
        "/api/embed", json={"texts": ["alpha", "beta"], "input_type": "query", "instruction": "Find", "dimensions": 4}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dimension"] == 4 and body["model"] == "fake-embedding"
    expected = services.embedding.calls[-1]
    assert expected == {"texts": ["alpha", "beta"], "input_type": "query", "instruction": "Find", "dimensions": 4}
    np.testing.assert_allclose(np.array(body["embeddings"]), _fake(["alpha", "beta"], "query", "Find", 4), rtol=1e-6)


def _fake(texts: list[str], input_type: str, instruction: str | None, dims: int | None) -> np.ndarray:
    """What a fresh fake provider gives for these inputs (the fakes are deterministic)."""
    provider = FakeEmbeddingProvider(dim=8)
    return asyncio.run(provider.embed(texts, input_type=input_type, instruction=instruction, dimensions=dims))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"texts": [f"t{i}" for i in range(11)]},
         "texts has 11 items; the limit is 10 (BACKEND_MAX_ITEMS_PER_REQUEST)"),
        ({"texts": ["ok", "x" * 31]}, "texts[1] has 31 characters; the limit is 30 (BACKEND_MAX_CHARS_PER_ITEM)"),
        ({"texts": ["a"], "dimensions": 9}, "dimensions is 9; the model's width is 8"),
    ],
)
def test_embed_limits_are_422_naming_limit_and_value(client: TestClient, payload: dict, message: str) -> None:
    error = error_of(client.post("/api/embed", json=payload), 422)
    assert error["message"] == message and error["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"texts": ["a", 5]}, "texts.1"),
        ({"texts": ["a", None]}, "texts.1"),
        ({"texts": "a"}, "texts"),
        ({"texts": []}, "texts"),
        ({"texts": ["a"], "input_type": "passage"}, "input_type"),
        ({"texts": ["a"], "dimensions": 0}, "dimensions"),
    ],
)
def test_embed_rejects_malformed_bodies(client: TestClient, payload: dict, where: str) -> None:
    assert error_of(client.post("/api/embed", json=payload), 422)["message"].startswith(where + ":")


def test_provider_failures_map_to_http(client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch):
    async def upstream_down(*args: Any, **kwargs: Any) -> np.ndarray:
        raise UpstreamError("openai answered HTTP 500: boom", provider="openai", upstream_status=500)

    monkeypatch.setattr(services.embedding, "embed", upstream_down)
    error = error_of(client.post("/api/embed", json={"texts": ["a"]}), 502)
    assert error == {"code": "upstream_error", "message": "openai answered HTTP 500: boom", "provider": "openai",
                     "upstream_status": 500}

    async def nan(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.full((1, 8), np.nan, dtype=np.float32)

    monkeypatch.setattr(services.embedding, "embed", nan)
    assert error_of(client.post("/api/embed", json={"texts": ["a"]}), 500)["code"] == "non_finite_output"


# --- rerank ------------------------------------------------------------------------------------------------
def test_rerank_sorts_by_score_with_indices(client: TestClient, services: Services) -> None:
    documents = ["cats purr", "milvus stores vectors", "vectors"]
    body = client.post(
        "/api/rerank", json={"query": "milvus vectors", "documents": documents, "top_n": 2, "return_documents": True}
    ).json()
    assert body == {
        "model": "fake-reranker",
        "results": [
            {"index": 1, "relevance_score": 1.0, "document": "milvus stores vectors"},
            {"index": 2, "relevance_score": 0.5, "document": "vectors"},
        ],
    }
    plain = client.post("/api/rerank", json={"query": "milvus vectors", "documents": documents}).json()["results"]
    assert [r["index"] for r in plain] == [1, 2, 0] and all("document" not in r for r in plain)
    assert services.reranker.calls[-1]["instruction"] is None


def test_compat_rerank_speaks_cohere_and_jina(client: TestClient) -> None:
    payload = {"model": "fake-reranker", "query": "milvus vectors", "documents": ["cats", "milvus vectors"]}
    payload["top_n"] = 1
    body = client.post("/v1/rerank", json=payload).json()
    assert body["model"] == "fake-reranker" and re.fullmatch(r"[0-9a-f-]{36}", body["id"])
    assert body["results"] == [{"index": 1, "relevance_score": 1.0, "document": {"text": "milvus vectors"}}]
    no_docs = client.post("/v1/rerank", json={**payload, "return_documents": False, "model": None}).json()
    assert no_docs["results"] == [{"index": 1, "relevance_score": 1.0}]
    error = error_of(client.post("/v1/rerank", json={**payload, "model": "other-reranker"}), 404)
    assert "model 'other-reranker' is not served here; the reranker is 'fake-reranker'" in error["message"]


@pytest.mark.parametrize("path", ["/api/rerank", "/v1/rerank"])
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"query": "", "documents": ["a"]}, "query: must not be empty"),
        ({"query": "   ", "documents": ["a"]}, "query: must not be empty"),
        ({"query": "q", "documents": ["a", "b", "c", "d"]}, "documents has 4 items; the limit is 3 (RERANKER_MAX_DOC"),
        ({"query": "q", "documents": ["a", "y" * 31]}, "documents[1] has 31 characters; the limit is 30"),
        ({"query": "q" * 31, "documents": ["a"]}, "query has 31 characters; the limit is 30 (BACKEND_MAX_CHARS_"),
        ({"query": "q", "documents": ["a", 3]}, "documents.1: Input should be a valid string"),
        ({"query": "q", "documents": []}, "documents: List should have at least 1 item"),
    ],
)
def test_rerank_limits_and_bad_input_are_422(client: TestClient, path: str, payload: dict, message: str) -> None:
    assert message in error_of(client.post(path, json=payload), 422)["message"]


def test_disabled_reranker_is_a_clear_404() -> None:
    with client_for(make_services()) as client:
        for path in ("/api/rerank", "/v1/rerank"):
            error = error_of(client.post(path, json={"query": "q", "documents": ["a"]}), 404)
            assert error["code"] == "provider_disabled" and "RERANKER_ENABLED=true" in error["message"]


# --- OpenAI-compatible /v1 ---------------------------------------------------------------------------------
def test_models_lists_the_served_names(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-embedding", "fake-reranker", "fake-multimodal"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])


def test_v1_embeddings_float_and_base64_agree(client: TestClient) -> None:
    request = {"model": "fake-embedding", "input": ["one two", "three"], "dimensions": 6}
    as_float = client.post("/v1/embeddings", json=request).json()
    as_b64 = client.post("/v1/embeddings", json={**request, "encoding_format": "base64"}).json()
    assert as_float["object"] == "list" and as_float["model"] == "fake-embedding"
    assert as_float["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    floats = np.array([item["embedding"] for item in as_float["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in as_b64["data"]])
    assert floats.shape == (2, 6) and [item["index"] for item in as_b64["data"]] == [0, 1]
    np.testing.assert_array_equal(decoded, floats)
    np.testing.assert_allclose(floats, _fake(["one two", "three"], "document", None, 6), rtol=1e-6)


def test_v1_embeddings_single_string_and_multimodal_name(client: TestClient, services: Services) -> None:
    body = client.post("/v1/embeddings", json={"model": "fake-embedding", "input": "solo"}).json()
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 8
    body = client.post("/v1/embeddings", json={"model": "fake-multimodal", "input": ["text"]}).json()
    assert len(body["data"][0]["embedding"]) == 16 and services.multimodal.calls[-1]["texts"] == ["text"]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"model": "gpt-4", "input": "x"}, 404, "model 'gpt-4' is not served here"),
        ({"model": "fake-reranker", "input": "x"}, 422, "model 'fake-reranker' is the reranker, not an embedding"),
        ({"model": "fake-embedding", "input": [f"i{n}" for n in range(11)]}, 422, "input has 11 items; the limit is"),
        ({"model": "fake-embedding", "input": ["x" * 31]}, 422, "input[0] has 31 characters; the limit is 30"),
        ({"model": "fake-embedding", "input": [[1, 2, 3]]}, 422, "input"),
        ({"model": "fake-embedding", "input": []}, 422, "input: must contain at least one text"),
        ({"model": "fake-embedding", "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": "x"}, 422, "model: Field required"),
    ],
)
def test_v1_embeddings_errors(client: TestClient, payload: dict, status: int, message: str) -> None:
    assert message in error_of(client.post("/v1/embeddings", json=payload), status)["message"]


def test_the_official_openai_client_works(client: TestClient) -> None:
    from openai import OpenAI

    openai = OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0)
    assert [model.id for model in openai.models.list()][0] == "fake-embedding"
    result = openai.embeddings.create(model="fake-embedding", input=["alpha", "beta"])  # base64 by default
    vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, _fake(["alpha", "beta"], "document", None, None), rtol=1e-6)
    assert result.usage.total_tokens == 2


# --- auth --------------------------------------------------------------------------------------------------
def test_auth_on_protects_api_and_v1_but_not_health_or_metrics() -> None:
    services = make_services(reranker=FakeRerankerProvider(), overrides={"backend": {"api_key": API_KEY}})
    calls = [
        ("post", "/api/embed", {"texts": ["a"]}),
        ("post", "/api/rerank", {"query": "q", "documents": ["a"]}),
        ("post", "/v1/rerank", {"query": "q", "documents": ["a"]}),
        ("post", "/v1/embeddings", {"model": "fake-embedding", "input": "a"}),
        ("get", "/v1/models", None),
    ]
    with client_for(services) as client:
        for method, path, body in calls:
            kwargs = {"json": body} if body is not None else {}
            missing = client.request(method, path, **kwargs)
            assert error_of(missing, 401)["code"] == "unauthorized" and missing.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, headers={"Authorization": "Bearer nope"}, **kwargs)
            assert wrong.status_code == 401
            right = client.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)
            assert right.status_code == 200, (path, right.text)
        # An unauthenticated malformed body is still a 401, not a 422 that would describe the API.
        assert client.post("/api/embed", json={"texts": [1]}).status_code == 401
        health = client.get("/api/health")
        assert health.status_code == 200 and API_KEY not in health.text
        assert client.get("/metrics").status_code == 200


def test_auth_off_needs_no_header(client: TestClient) -> None:
    assert client.post("/api/embed", json={"texts": ["a"]}).status_code == 200
    assert client.get("/v1/models").status_code == 200


# --- metrics -----------------------------------------------------------------------------------------------
def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_latency_and_errors_by_route(client: TestClient) -> None:
    before = client.get("/metrics").text
    client.post("/api/embed", json={"texts": ["a"]})
    client.post("/api/embed", json={"texts": ["a"]})
    client.post("/api/embed", json={"texts": []})
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    ok = {"method": "POST", "route": "/api/embed", "status": "200"}
    assert delta("backend_http_requests_total", **ok) == 2
    assert delta("backend_http_requests_total", **{**ok, "status": "422"}) == 1
    assert delta("backend_http_request_errors_total", **{**ok, "status": "422"}) == 1
    assert delta("backend_http_request_errors_total", **ok) == 0
    assert delta("backend_http_request_errors_total", method="GET", route="unmatched", status="404") == 1
    assert delta("backend_http_request_duration_seconds_count", method="POST", route="/api/embed") == 3
    assert "python_gc_objects_collected_total" in after  # the default registry, where other modules register too
