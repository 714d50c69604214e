"""RAGService with deterministic fake providers on embedded Milvus Lite: ingest, replace, delete, query modes,
rerank, LLM answer, and the HTTP routes."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from backend.api.state import Services
from backend.config import Settings
from backend.errors import (
    ConfigurationError,
    InvalidRequestError,
    NotFoundError,
    ProviderDisabledError,
    StoreUnavailableError,
)
from backend.main import create_app
from backend.services.llm import ChatLLM
from backend.services.rag_service import Document, RAGService
from tests.rag_fakes import FakeEmbedding, FakeMultimodal, FakeReranker

_names = itertools.count()

PASSAGES = {
    "volcano": "Volcanoes erupt when magma rises through the crust and escapes as lava and ash.",
    "glacier": "Glaciers are slow rivers of ice that carve valleys as they move downhill.",
    "coral": "Coral reefs are built by tiny animals that secrete limestone skeletons in warm seas.",
    "desert": "Deserts receive very little rain, and their sand dunes shift with the wind.",
}


@pytest.fixture(scope="module")
def lite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag") / "milvus.db"


def make_settings(lite_path: Path, **groups: dict) -> Settings:
    milvus = {"uri": str(lite_path), "collection_name": f"rag{next(_names)}", "index_type": "FLAT",
              **groups.pop("milvus", {})}
    rag = {"chunk_size": 120, "chunk_overlap": 20, **groups.pop("rag", {})}
    return Settings.load(milvus=milvus, rag=rag, **groups)


async def make_service(lite_path: Path, *, rerank_with=None, multimodal=None, **groups: dict) -> RAGService:
    return await RAGService.create(make_settings(lite_path, **groups), FakeEmbedding(), reranker=rerank_with,
                                   multimodal=multimodal)


@pytest.fixture
async def rag(lite_path: Path) -> AsyncIterator[RAGService]:
    service = await make_service(lite_path)
    yield service
    await service.close()


def docs(**texts: str) -> list[Document]:
    return [Document(doc_id=key, text=text, metadata={"source": f"{key}.txt"}) for key, text in texts.items()]


async def test_ingest_then_query_returns_ranked_contexts_with_sources(rag: RAGService) -> None:
    result = await rag.ingest(docs(**PASSAGES))
    assert [r["doc_id"] for r in result] == list(PASSAGES) and all(r["chunks"] == 1 for r in result)
    answer = await rag.aquery("How do glaciers carve valleys of ice?", top_k=2)
    assert [c.doc_id for c in answer.contexts][0] == "glacier"
    top = answer.contexts[0]
    assert top.metadata == {"source": "glacier.txt"} and top.text == PASSAGES["glacier"] and top.id == "glacier:0"
    assert len(answer.contexts) == 2 and answer.contexts[0].score >= answer.contexts[1].score
    assert answer.answer is None and not answer.reranked
    assert rag.embedding.calls[-1] == (["How do glaciers carve valleys of ice?"], "query")
    assert rag.embedding.calls[0][1] == "document"


async def test_reingest_replaces_chunks_and_is_idempotent(rag: RAGService) -> None:
    long_text = " ".join(f"Part {i} of the long manual explains step {i} in detail." for i in range(30))
    first = await rag.ingest(docs(manual=long_text))
    chunks = first[0]["chunks"]
    assert chunks > 3 and rag.store.count() == chunks
    again = await rag.ingest(docs(manual=long_text))
    assert again[0] == {"doc_id": "manual", "chunks": chunks, "removed": 0} and rag.store.count() == chunks
    shorter = await rag.ingest(docs(manual="The manual now fits in one short chunk."))
    assert shorter[0] == {"doc_id": "manual", "chunks": 1, "removed": chunks - 1}
    rows = rag.store.query('doc_id == "manual"', ["id", "text"])
    assert [(r["id"], r["text"]) for r in rows] == [("manual:0", "The manual now fits in one short chunk.")]


async def test_a_crash_between_upsert_and_cleanup_then_a_retry_leaves_one_copy(rag: RAGService, monkeypatch) -> None:
    long_text = " ".join(f"Chapter {i} tells its own story about item {i}." for i in range(20))
    old_chunks = (await rag.ingest(docs(book=long_text)))[0]["chunks"]
    new_text = " ".join(f"Edition two chapter {i}." for i in range(8))

    def crash(*args, **kwargs):
        raise StoreUnavailableError("simulated crash after the upsert")

    with monkeypatch.context() as patch:
        patch.setattr(rag.store, "delete_doc", crash)
        with pytest.raises(StoreUnavailableError, match="simulated"):
            await rag.ingest(docs(book=new_text))
    assert rag.store.count() == old_chunks  # new chunks overwrote old keys; the stale tail is still there
    new_chunks = (await rag.ingest(docs(book=new_text)))[0]["chunks"]
    rows = rag.store.query('doc_id == "book"', ["chunk_no", "text"])
    assert sorted(r["chunk_no"] for r in rows) == list(range(new_chunks))
    assert all("Edition two" in r["text"] for r in rows)


async def test_delete_removes_a_document_and_unknown_is_404(rag: RAGService) -> None:
    await rag.ingest(docs(**PASSAGES))
    assert await rag.delete("coral") == 1
    hits = await rag.aquery("coral reefs limestone skeletons", top_k=10)
    assert "coral" not in {c.doc_id for c in hits.contexts}
    with pytest.raises(NotFoundError, match="'coral'") as caught:
        await rag.delete("coral")
    assert caught.value.status_code == 404


async def test_bad_input_is_refused_before_anything_is_written(rag: RAGService) -> None:
    with pytest.raises(InvalidRequestError, match="No documents"):
        await rag.ingest([])
    with pytest.raises(InvalidRequestError, match="appears twice"):
        await rag.ingest([Document("a", "x"), Document("a", "y")])
    with pytest.raises(InvalidRequestError, match="neither text nor an image"):
        await rag.ingest([Document("ok", "fine"), Document("blank", "   ")])
    with pytest.raises(ProviderDisabledError, match="MULTIMODAL_EMBEDDING_ENABLED"):
        await rag.ingest([Document("pic", image="image:red")])
    assert rag.store.count() == 0
    with pytest.raises(InvalidRequestError, match="empty"):
        await rag.aquery("  ")
    with pytest.raises(InvalidRequestError, match="top_k"):
        await rag.aquery("x", top_k=0)
    with pytest.raises(ProviderDisabledError, match="mode 'hybrid'"):
        await rag.aquery("x", mode="hybrid")


async def test_reranker_reorders_candidates_and_keeps_top_n(lite_path: Path) -> None:
    reranker = FakeReranker()
    rag = await make_service(lite_path, rerank_with=reranker, reranker={"top_n": 2})
    try:
        await rag.ingest(docs(**PASSAGES))
        result = await rag.aquery("wind sand dunes rain")
        assert reranker.calls == 1 and result.reranked and len(result.contexts) == 2  # RERANKER_TOP_N
        assert result.contexts[0].doc_id == "desert" and result.contexts[0].score == pytest.approx(1.0)
        assert result.contexts[0].retrieval_score != result.contexts[0].score
    finally:
        await rag.close()


async def test_image_and_hybrid_modes_with_a_multimodal_provider(lite_path: Path) -> None:
    rag = await make_service(lite_path, multimodal=FakeMultimodal())
    try:
        await rag.ingest(docs(**PASSAGES) + [
            Document("red-apple", image="image:red apple fruit", image_ref="img/apple.png"),
            Document("lava", text="Photo of glowing lava", image="image:lava volcano glow"),
        ])
        assert rag.store.count() == len(PASSAGES) + 2
        image = await rag.aquery("volcano lava", top_k=10, mode="image")
        assert [c.doc_id for c in image.contexts] == ["lava", "red-apple"]  # text-only chunks never come back
        assert image.contexts[1].image_ref == "img/apple.png"
        hybrid = await rag.aquery("volcano lava", top_k=10, mode="hybrid")
        found = [c.doc_id for c in hybrid.contexts]
        assert found[0] in ("lava", "volcano") and {"lava", "volcano", "red-apple"} <= set(found)
    finally:
        await rag.close()


async def test_llm_answer_cites_the_contexts(rag: RAGService) -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.headers["authorization"] == "Bearer sk-test"
        return httpx.Response(200, json={"choices": [{"message": {"content": "Glaciers carve valleys [1]."}}]})

    llm = {"base_url": "http://llm.local/v1", "model": "m", "api_key": "sk-test"}
    settings = make_settings(Path("unused"), llm=llm)
    rag.llm = ChatLLM(settings.llm, transport=httpx.MockTransport(handler))
    await rag.ingest(docs(**PASSAGES))
    result = await rag.aquery("How do glaciers carve valleys?", top_k=2)
    assert result.answer == "Glaciers carve valleys [1]."
    prompt = seen[0]["messages"][-1]["content"]
    assert seen[0]["model"] == "m" and f"[1] {PASSAGES['glacier']}" in prompt and "[2] " in prompt
    assert (await rag.aquery("How do glaciers carve valleys?", answer=False)).answer is None


async def test_dimension_guard_through_the_service(lite_path: Path) -> None:
    settings = make_settings(lite_path)
    first = await RAGService.create(settings, FakeEmbedding(dim=64))
    await first.close()
    with pytest.raises(ConfigurationError, match=r"64-d.*\(fake, wide\) produces 96-d.*scripts/reindex.py"):
        await RAGService.create(settings, FakeEmbedding(dim=96, name="wide"))


async def test_http_routes(rag: RAGService) -> None:
    services = Services(settings=rag.settings, embedding=rag.embedding, rag=rag, ready=True)
    app = create_app(services=services)
    app.state.services = services
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        body = {"documents": [{"doc_id": k, "text": v, "metadata": {"source": k}} for k, v in PASSAGES.items()]}
        response = await client.post("/api/documents", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["collection"] == rag.store.collection
        response = await client.post("/api/query", json={"question": "coral reefs in warm seas", "top_k": 1})
        assert response.status_code == 200
        assert response.json()["contexts"][0]["doc_id"] == "coral"
        assert (await client.delete("/api/documents/coral")).json() == {"doc_id": "coral", "deleted": 1}
        missing = await client.delete("/api/documents/coral")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        bad = await client.post("/api/query", json={"question": "x", "mode": "image"})
        assert bad.status_code == 404 and "MULTIMODAL_EMBEDDING_ENABLED" in bad.json()["error"]["message"]
        assert (await client.post("/api/query", json={"question": ""})).status_code == 422
        rag.store.client.close()  # the store goes away: 503 with the cause
        down = await client.post("/api/query", json={"question": "glaciers"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
