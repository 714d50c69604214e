"""The embedded default: with no .env.backend, the backend serves the packaged all-MiniLM-L6-v2 on the CPU through
LocalEmbeddingProvider. Checked against sentence-transformers itself, over HTTP (/api/health, /api/embed) and
with the official `openai` client on /v1/embeddings of a running uvicorn server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
import torch
import uvicorn
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from backend.config import PACKAGED_MINILM, EmbeddingConfig, ProviderType, Settings
from backend.main import create_app
from backend.providers.local_embedding import LocalEmbeddingProvider
from backend.services.model_factory import create_embedding_provider

CAT, KITTEN, STOCKS = "a cat sits on the mat", "a kitten is on the rug", "stock markets fell today"
TEXTS = [CAT, KITTEN, STOCKS, "", "word " * 400, "Ünïcödé — 日本語のテキスト", "x"]
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider():
    instance = create_embedding_provider(Settings.load().embedding)
    await instance.warmup()
    yield instance
    await instance.close()


def test_default_settings_select_the_packaged_minilm_on_the_cpu() -> None:
    config = Settings.load().embedding
    assert config.provider == ProviderType.LOCAL_GPU and config.model_path == PACKAGED_MINILM
    assert (config.device, config.resolved_dtype()) == ("cpu", "float32")


@module_loop
async def test_provider_equals_sentence_transformers_encode(provider, reference) -> None:
    assert isinstance(provider, LocalEmbeddingProvider)
    assert provider.embedding_dim == 384 and provider.max_token_size == 256
    got = await provider.embed(TEXTS)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    alone = np.concatenate([await provider.embed([t]) for t in TEXTS[:3]])
    np.testing.assert_allclose(alone, reference[:3], atol=1e-5)
    np.testing.assert_allclose(got[0, :3], [0.12872, -0.03267, -0.02292], atol=1e-5)  # golden (fixtures.md)


@module_loop
async def test_semantics_cat_is_closer_to_kitten_than_to_stocks(provider) -> None:
    cat, kitten, stocks = await provider.embed([CAT, KITTEN, STOCKS])
    assert float(cat @ kitten) > 0.5 > 0.2 > float(cat @ stocks)


def test_pooling_override_uses_the_cls_token(minilm_dir: Path) -> None:
    cls = LocalEmbeddingProvider(EmbeddingConfig(_env_file=None, pooling="cls"))
    assert cls.info().extra["pooling"] == "cls"

    async def embed_and_close() -> np.ndarray:
        try:
            return await cls.embed([CAT])
        finally:
            await cls.close()

    got = asyncio.run(embed_and_close())
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoder = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.inference_mode():
        hidden = encoder(**tokenizer([CAT], return_tensors="pt")).last_hidden_state[:, 0]
    want = torch.nn.functional.normalize(hidden, dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# --- the running backend ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn serving create_app(Settings.load()) on a free local port, in a thread."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BACKEND_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        app = create_app(Settings.load())
        port = _free_port()
        instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=instance.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not instance.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            instance.should_exit = True
            thread.join(30)


def test_health_shows_the_local_provider(server: str) -> None:
    body = httpx.get(f"{server}/api/health").json()
    embedding = body["providers"]["embedding"]
    assert body["status"] == "ok"
    assert embedding["provider"] == "local_gpu" and embedding["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (embedding["device"], embedding["dtype"], embedding["dimension"]) == ("cpu", "float32", 384)
    assert embedding["memory_bytes"] > 80_000_000 and embedding["max_batch_tokens"] >= 256


def test_api_embed_and_openai_client_return_the_same_vectors(server: str, reference: np.ndarray) -> None:
    response = httpx.post(f"{server}/api/embed", json={"texts": TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    api = np.asarray(response.json()["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(api, reference, atol=1e-5)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    for encoding in ("float", "base64"):
        result = client.embeddings.create(
            model="sentence-transformers/all-MiniLM-L6-v2", input=TEXTS, encoding_format=encoding
        )
        vectors = np.asarray([item.embedding for item in sorted(result.data, key=lambda d: d.index)])
        if encoding == "base64":  # the raw client hands base64 strings back undecoded
            vectors = np.stack([np.frombuffer(__import__("base64").b64decode(v), dtype="<f4") for v in vectors])
        np.testing.assert_allclose(vectors.astype(np.float32), api, atol=1e-6)
        assert result.usage.prompt_tokens > len(TEXTS)
    default = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=CAT)
    np.testing.assert_allclose(np.asarray(default.data[0].embedding, dtype=np.float32), api[0], atol=1e-6)


def test_bad_requests_get_422(server: str) -> None:
    wrong_type = httpx.post(f"{server}/api/embed", json={"texts": ["ok", 3]})
    assert wrong_type.status_code == 422
    too_many = httpx.post(f"{server}/api/embed", json={"texts": [""] * 10_001}, timeout=60)
    assert too_many.status_code == 422 and "10000" in too_many.text
