"""POST /api/embed/multimodal on the tiny random Qwen2-VL: shapes, equality with the provider, a 422 per bad image."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.api.state import Services
from backend.config import Settings
from backend.main import create_app
from backend.providers.base import BaseEmbeddingProvider, ProviderInfo
from backend.providers.multimodal import MultimodalEmbeddingProvider

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16 * 28 * 28


class UnusedTextEmbedder(BaseEmbeddingProvider):
    """The text slot is not under test here."""

    embedding_dim = 8

    async def embed(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        raise AssertionError("not used")

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="fake", model="unused")


def png_b64(size: tuple[int, int] = (60, 45), seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_b64(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return base64.b64encode(bytes(data)).decode()


@pytest.fixture
async def api(tiny_qwen2vl_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, MultimodalEmbeddingProvider]]:
    settings = Settings.load(
        multimodal={
            "enabled": True,
            "model_name": "tiny-gme",
            "model_path": str(tiny_qwen2vl_dir),
            "device": "cpu",
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
            "max_image_pixels": 1_000_000,
            "max_image_bytes": 200_000,
            "max_batch_tokens": 2048,
            "warmup": False,
        },
        backend={"max_items_per_request": 6, "max_chars_per_item": 500},
    )
    provider = MultimodalEmbeddingProvider(settings.multimodal)
    services = Services(settings=settings, embedding=UnusedTextEmbedder(), multimodal=provider)
    app = create_app(services=services)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client, provider
    finally:
        await provider.close()


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/api/embed/multimodal", json=body)


async def test_texts_images_and_pairs_give_rows_of_the_model_width_in_request_order(api) -> None:
    client, provider = api
    image = png_b64()
    body = {
        "texts": ["a red apple", "paris"],
        "images": [image, f"data:image/png;base64,{image}"],
        "pairs": [{"text": "a red apple", "image": image}],
    }
    response = await post(client, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "tiny-gme"
    assert data["dimension"] == provider.embedding_dim == 64
    rows = np.asarray(data["embeddings"], dtype=np.float32)
    assert rows.shape == (5, 64)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.allclose(rows[0:2], await provider.embed(["a red apple", "paris"]), atol=1e-6)
    decoded = Image.open(io.BytesIO(base64.b64decode(image)))
    assert np.allclose(rows[2], rows[3], atol=1e-6)  # base64 and data URI: the same image
    assert np.allclose(rows[2:4], await provider.embed_images([decoded, decoded]), atol=1e-6)
    assert np.allclose(rows[4:5], await provider.embed_fused(["a red apple"], [decoded]), atol=1e-6)


async def test_query_instruction_changes_text_vectors(api) -> None:
    client, provider = api
    document = (await post(client, {"texts": ["paris"]})).json()["embeddings"]
    query = (await post(client, {"texts": ["paris"], "input_type": "query"})).json()["embeddings"]
    given = (await post(client, {"texts": ["paris"], "input_type": "query", "instruction": "Find a map."})).json()
    assert np.allclose(query, await provider.embed(["paris"], input_type="query"), atol=1e-6)
    expected = await provider.embed(["paris"], input_type="query", instruction="Find a map.")
    assert np.allclose(given["embeddings"], expected, atol=1e-6)
    assert np.abs(np.asarray(document) - np.asarray(query)).max() > 1e-3


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        (base64.b64encode(b"definitely not an image").decode(), "cannot decode"),
        ("", "empty"),
        ("%%% not base64 %%%", "invalid base64"),
        (bomb_b64(5_000), "MAX_IMAGE_PIXELS"),  # 25 M px declared in a 70-byte file
        (bomb_b64(100_000), "MAX_IMAGE_PIXELS"),  # 1e10 px: PIL's own bomb guard
        (png_b64((400, 400)), "MAX_IMAGE_BYTES"),  # ~480 kB of noise > 200 kB
        ("https://example.invalid/cat.png", "ALLOW_IMAGE_URLS=false"),
        ("/etc/hostname", "invalid base64"),  # a path is never read through the API
    ],
)
async def test_each_bad_image_gives_422_naming_the_problem_and_the_server_keeps_serving(
    api, image: str, needle: str
) -> None:
    client, _ = api
    for body in ({"images": [png_b64(), image]}, {"pairs": [{"text": "x", "image": image}]}):
        response = await post(client, body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_image"
        assert needle in error["message"]
    ok = await post(client, {"images": [png_b64()], "texts": ["still serving"]})
    assert ok.status_code == 200 and len(ok.json()["embeddings"]) == 2


async def test_zero_size_image_gives_422(api) -> None:
    client, _ = api
    # A PNG whose header declares 0x0 pixels.
    response = await post(client, {"images": [bomb_b64(0)]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_image"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "at least one of texts, images or pairs"),
        ({"texts": []}, "at least one of texts, images or pairs"),
        ({"texts": ["a"] * 4, "images": [png_b64()] * 3}, "BACKEND_MAX_ITEMS_PER_REQUEST"),
        ({"texts": ["a" * 501]}, "BACKEND_MAX_CHARS_PER_ITEM"),
        ({"pairs": [{"text": "a" * 501, "image": "x"}]}, "pairs[0].text"),
        ({"texts": [3]}, "texts.0"),
        ({"pairs": [{"text": "a"}]}, "pairs.0.image"),
        ({"texts": ["a"], "input_type": "passage"}, "input_type"),
    ],
)
async def test_bad_requests_give_422(api, body: dict[str, Any], needle: str) -> None:
    client, _ = api
    response = await post(client, body)
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"]


async def test_health_shows_the_multimodal_slot(api) -> None:
    client, _ = api
    response = await client.get("/api/health")
    assert response.status_code == 200
    slot = response.json()["providers"]["multimodal"]
    assert slot["enabled"] is True and slot["dimension"] == 64 and slot["model"] == "tiny-gme"
