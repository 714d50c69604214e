"""/api/rerank and /v1/rerank served by the real LocalRerankerProvider on the tiny Qwen3-Reranker fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from backend.config import RerankerConfig, Settings
from backend.main import create_app
from backend.providers.local_reranker import LocalRerankerProvider
from tests.fakes import make_services

MODEL = "tiny-qwen3-reranker"
QUERY = "what is the capital of france"
DOCS = ["the cat sits on the mat", "paris is the capital of france", "a dog", "the cat sits on the mat", "banana"]


async def _client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
async def provider(tiny_qwen3_reranker_dir: Path) -> AsyncIterator[LocalRerankerProvider]:
    config = RerankerConfig(
        enabled=True, model_name=MODEL, model_path=str(tiny_qwen3_reranker_dir), max_length=256, max_documents=6
    )
    reranker = LocalRerankerProvider(config)
    yield reranker
    await reranker.close()


@pytest.fixture
async def client(provider: LocalRerankerProvider) -> AsyncIterator[httpx.AsyncClient]:
    services = make_services(reranker=provider, overrides={"reranker": {"max_documents": 6}})
    async for http in _client(create_app(services=services)):
        yield http


def _assert_ranked(results: list[dict], expected_scores: list[float]) -> None:
    """Best first, ties in input order, each score the provider's score of that index."""
    keys = [(-r["relevance_score"], r["index"]) for r in results]
    assert keys == sorted(keys)
    for result in results:
        np.testing.assert_allclose(result["relevance_score"], expected_scores[result["index"]], rtol=0, atol=1e-6)


async def test_api_rerank_orders_by_score(client: httpx.AsyncClient, provider: LocalRerankerProvider) -> None:
    expected = await provider.rerank(QUERY, DOCS)
    response = await client.post("/api/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCS)))
    assert all("document" not in r for r in body["results"])
    _assert_ranked(body["results"], expected)
    duplicates = [r for r in body["results"] if r["index"] in (0, 3)]
    assert duplicates[0]["relevance_score"] == duplicates[1]["relevance_score"]


async def test_api_rerank_top_n_and_return_documents(client, provider) -> None:
    expected = await provider.rerank(QUERY, DOCS)
    payload = {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True}
    body = (await client.post("/api/rerank", json=payload)).json()
    assert len(body["results"]) == 2
    _assert_ranked(body["results"], expected)
    assert body["results"][0]["index"] == int(np.argmax(expected))
    assert all(r["document"] == DOCS[r["index"]] for r in body["results"])


async def test_api_rerank_per_call_instruction(client, provider) -> None:
    instruction = "Judge whether the document mentions an animal"
    expected = await provider.rerank(QUERY, DOCS, instruction=instruction)
    assert not np.allclose(expected, await provider.rerank(QUERY, DOCS), atol=1e-6)
    payload = {"query": QUERY, "documents": DOCS, "instruction": instruction}
    body = (await client.post("/api/rerank", json=payload)).json()
    _assert_ranked(body["results"], expected)


async def test_v1_rerank_cohere_shape(client, provider) -> None:
    expected = await provider.rerank(QUERY, DOCS)
    response = await client.post("/v1/rerank", json={"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["id"]
    assert len(body["results"]) == 3
    _assert_ranked(body["results"], expected)
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in body["results"])  # returned by default
    plain = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": False})
    assert plain.status_code == 200
    assert len(plain.json()["results"]) == len(DOCS) and all("document" not in r for r in plain.json()["results"])
    _assert_ranked(plain.json()["results"], expected)


async def test_v1_rerank_other_model_is_not_found(client) -> None:
    response = await client.post("/v1/rerank", json={"model": "other", "query": QUERY, "documents": DOCS})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": "   ", "documents": ["a"]}, "query"),
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": QUERY, "documents": ["a"] * 7}, "documents has 7 items; the limit is 6 (RERANKER_MAX_DOCUMENTS)"),
        ({"query": QUERY, "documents": ["a", 3]}, "documents"),
        ({"query": QUERY, "documents": ["a"], "top_n": 0}, "top_n"),
    ],
)
@pytest.mark.parametrize("route", ["/api/rerank", "/v1/rerank"])
async def test_bad_requests_are_422(client, route: str, payload: dict, message: str) -> None:
    response = await client.post(route, json=payload)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


async def test_app_built_from_settings_serves_local_reranker(
    tiny_qwen3_reranker_dir: Path, tiny_qwen3_embedding_dir: Path
) -> None:
    settings = Settings.load(
        embedding={"model_path": str(tiny_qwen3_embedding_dir), "max_length": 256},
        reranker={
            "enabled": True,
            "provider": "local_gpu",
            "model_path": str(tiny_qwen3_reranker_dir),
            "model_name": MODEL,
            "max_length": 256,
        },
    )
    app = create_app(settings)
    async for http in _client(app):
        reranker = app.state.services.reranker
        assert isinstance(reranker, LocalRerankerProvider) and reranker.path_name == "qwen3_yes_no"
        expected = await reranker.rerank(QUERY, DOCS)
        body = (await http.post("/api/rerank", json={"query": QUERY, "documents": DOCS})).json()
        _assert_ranked(body["results"], expected)
        health = (await http.get("/api/health")).json()
        assert MODEL in str(health) and "qwen3_yes_no" in str(health)
