"""The online -> local migration: a collection built by the OpenAI-compatible provider (pointed at a loopback
server of ours) is re-indexed to the packaged local MiniLM. Nothing lost, nothing doubled, resumable, and the
switch happens only when the copy is complete."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from backend.config import Settings
from backend.errors import ConfigurationError
from backend.providers.base import BaseEmbeddingProvider, ProviderInfo
from backend.services import model_factory
from backend.services.rag_service import Document, RAGService
from backend.services.reindex import Reindexer
from backend.services.vector_store import active_collection, collection_dims, versioned_collections
from tests.milvus_server import free_port
from tests.rag_fakes import bag_of_words

ONLINE_DIM = 48
SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def loopback_openai() -> Iterator[dict[str, Any]]:
    """An OpenAI-compatible /v1/embeddings server on 127.0.0.1 (hashed bag-of-words vectors), and its call log."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any]) -> dict[str, Any]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        calls.append(len(texts))
        data = [{"object": "embedding", "index": i, "embedding": bag_of_words(t, ONLINE_DIM).tolist()}
                for i, t in enumerate(texts)]
        return {"object": "list", "model": body["model"], "data": data}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the loopback embeddings server did not start"
        time.sleep(0.02)
    yield {"base_url": f"http://127.0.0.1:{port}/v1", "calls": calls}
    server.should_exit = True
    thread.join(timeout=10)


def corpus() -> list[Document]:
    rows = [json.loads(line) for line in (SAMPLES / "corpus.jsonl").read_text().splitlines() if line.strip()]
    docs = [Document(r["doc_id"], f"{r['title']}\n\n{r['text']}", {"title": r["title"]}) for r in rows]
    long_text = " ".join(f"Appendix paragraph {i} repeats the maintenance rule number {i}." for i in range(40))
    return docs + [Document("appendix", long_text, {"title": "Appendix"})]


def settings_for(tmp_path: Path, **embedding: Any) -> Settings:
    return Settings.load(env_file=os.devnull, embedding=embedding,
                         milvus={"uri": str(tmp_path / "milvus.db"), "index_type": "HNSW"},
                         rag={"chunk_size": 300, "chunk_overlap": 40})


def snapshot(rag: RAGService) -> dict[str, tuple[str, str, int, str]]:
    fields = ["id", "doc_id", "chunk_no", "text", "metadata"]
    rows = [row for batch in rag.store.iterate(fields, batch_size=50) for row in batch]
    assert len(rows) == len({row["id"] for row in rows}), "a key appears twice"
    return {row["id"]: (row["doc_id"], row["text"], row["chunk_no"], json.dumps(row["metadata"])) for row in rows}


class Interrupted(RuntimeError):
    pass


class FailingAfter(BaseEmbeddingProvider):
    """Delegates to `inner`, counts embedded texts, and dies after `calls` embed calls (a crash mid-run)."""

    def __init__(self, inner: BaseEmbeddingProvider, calls: int | None = None) -> None:
        self.inner, self.calls_left, self.texts = inner, calls, 0

    @property
    def embedding_dim(self) -> int:
        return self.inner.embedding_dim

    async def embed(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        if self.calls_left is not None:
            if self.calls_left == 0:
                raise Interrupted("simulated crash during the re-index")
            self.calls_left -= 1
        self.texts += len(texts)
        return await self.inner.embed(texts, **kwargs)

    def info(self) -> ProviderInfo:
        return self.inner.info()


async def test_online_to_local_migration(tmp_path: Path, loopback_openai: dict[str, Any]) -> None:
    online_settings = settings_for(tmp_path, provider="openai", base_url=loopback_openai["base_url"],
                                   model_name="loopback-embed", api_key="sk-loop")
    online = model_factory.create_embedding_provider(online_settings.embedding)
    await online.warmup()  # probes the width over http
    assert online.embedding_dim == ONLINE_DIM
    rag = await RAGService.create(online_settings, online)
    await rag.ingest(corpus())
    before = snapshot(rag)
    assert len(before) > len(corpus()) and loopback_openai["calls"]  # the appendix spans several chunks
    await rag.close()
    await online.close()

    local_settings = settings_for(tmp_path)  # the embedded default: packaged MiniLM on the CPU
    local = model_factory.create_embedding_provider(local_settings.embedding)
    await local.warmup()
    try:
        with pytest.raises(ConfigurationError, match=rf"{ONLINE_DIM}-d text vectors.*produces 384-d.*reindex"):
            await RAGService.create(local_settings, local)

        crashing = FailingAfter(local, calls=2)
        job = Reindexer(local_settings, crashing, batch_size=16, progress=False, say=lambda _: None)
        with pytest.raises(Interrupted):
            await job.run()
        assert active_collection(job.client, "rag_chunks") == "rag_chunks_v1"  # no switch on a partial copy
        partial = job._store("rag_chunks_v2").count()
        assert partial == 32
        job.close()
        with pytest.raises(ConfigurationError, match="reindex"):  # still refused: v1 is still the active one
            await RAGService.create(local_settings, local)

        resumed = FailingAfter(local)
        job = Reindexer(local_settings, resumed, batch_size=16, progress=False, say=lambda _: None)
        result = await job.run()
        assert result.resumed and result.target == "rag_chunks_v2" and result.rows == len(before)
        assert resumed.texts == result.embedded == len(before) - partial  # only what was missing
        assert sorted(versioned_collections(job.client, "rag_chunks").values()) == ["rag_chunks_v1", "rag_chunks_v2"]
        assert collection_dims(job.client, "rag_chunks_v1") == (ONLINE_DIM, None)  # the old one is kept
        with pytest.raises(ConfigurationError, match="active collection"):
            job.drop("rag_chunks_v2")
        job.close()

        migrated = await RAGService.create(local_settings, local)
        try:
            assert migrated.store.collection == "rag_chunks_v2" and migrated.store.text_dim == 384
            assert snapshot(migrated) == before  # same keys, texts, chunk numbers and metadata
            hits = await migrated.aquery("Who stayed in lunar orbit while his crewmates walked on the Moon?", top_k=3)
            assert hits.contexts[0].doc_id == "apollo-11"
            await migrated.ingest([Document("apollo-11", "Apollo 11 landed on the Moon in July 1969.")])
            assert migrated.store.count() == len(before)  # re-ingest after the migration still replaces
        finally:
            await migrated.close()

        job = Reindexer(local_settings, None, progress=False, say=lambda _: None)
        job.drop("rag_chunks_v1")
        assert list(versioned_collections(job.client, "rag_chunks").values()) == ["rag_chunks_v2"]
        job.close()
    finally:
        await local.close()


def test_reindex_cli_status_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reindex_cli", Path(__file__).parents[1] / "scripts" / "reindex.py")
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "empty.db"))
    assert cli.main(["--status"]) == 0
    assert "'rag_chunks' -> (none)" in capsys.readouterr().out
    assert cli.main(["--drop", "rag_chunks_v7"]) == 1
    assert "not a version of 'rag_chunks'" in capsys.readouterr().err
