"""MultimodalEmbeddingProvider (GME-Qwen2-VL, native) against the official recipe, on the tiny random Qwen2-VL.

The reference (tests/gme_reference.py) is written from the official pipeline (shared/docs/models.md §3.2-3.4),
independently of backend/providers/{gme,images}.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from backend.config import MultimodalEmbeddingConfig
from backend.errors import (
    ConfigurationError,
    DeviceError,
    InvalidImageError,
    InvalidInputTypeError,
    InvalidRequestError,
    NonFiniteOutputError,
)
from backend.providers.gme import GmeInputBuilder, format_input
from backend.providers.images import fetch_image
from backend.providers.multimodal import MultimodalEmbeddingProvider
from backend.services import model_factory
from tests.gme_reference import OfficialGme, official_fetch_image

# Bounds different from the fixture processor's own (4..64 tokens), so the test sees that the settings apply.
MIN_PIXELS = 8 * 28 * 28
MAX_PIXELS = 32 * 28 * 28
QUERY_INSTRUCTION = "Find an image that matches the given text."

TEXTS = ["a red apple", "the cat sits on the mat and the dog sits on the rug today", "paris"]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Sizes that exercise the resizes: rounding only, up-scaling to min_pixels, down-scaling to max_pixels.
IMAGES = [random_image(120, 90, 1), random_image(30, 20, 2), random_image(300, 200, 3)]


@pytest.fixture(scope="module")
def official(tiny_qwen2vl_dir: Path) -> OfficialGme:
    return OfficialGme(tiny_qwen2vl_dir, torch.float32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def make_config(model_dir: Path, **overrides: Any) -> MultimodalEmbeddingConfig:
    options: dict[str, Any] = {
        "enabled": True,
        "model_path": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "max_batch_tokens": 4096,
        "max_batch_size": 8,
        "warmup": True,
    }
    options.update(overrides)
    return MultimodalEmbeddingConfig(_env_file=None, **options)


@pytest.fixture
async def provider(tiny_qwen2vl_dir: Path):
    instance = MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir))
    await instance.warmup()
    try:
        yield instance
    finally:
        await instance.close()


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= tol, np.abs(actual - expected).max()


# --- the input pipeline alone (no batcher) ----------------------------------------------------------------
def test_format_input_is_the_official_string() -> None:
    assert format_input("hi", has_image=True, instruction="Do it.") == (
        "<|im_start|>system\nDo it.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi"
        "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    )
    text_only = format_input(None, has_image=False, instruction="x")
    assert text_only.endswith("user\n<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")


def test_builder_ids_and_pixels_equal_the_official_processor_call(
    official: OfficialGme, tiny_qwen2vl_dir: Path
) -> None:
    builder = GmeInputBuilder(
        AutoProcessor.from_pretrained(tiny_qwen2vl_dir, use_fast=False),
        max_length=1800,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    for text, image in [("a cat", IMAGES[2]), (None, IMAGES[1]), ("a cat", None)]:
        prompt = format_input(text, has_image=image is not None, instruction="You are a helpful assistant.")
        expected = official.processor(
            text=[prompt], images=[official_fetch_image(image)] if image else None, return_tensors="pt"
        )
        features = builder.build(text, fetch_image(image) if image else None, "You are a helpful assistant.")
        assert features.input_ids == expected["input_ids"][0].tolist()
        if image is not None:
            batch = builder.collate([features])
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
            assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
            # The cost counts the image tokens: grid_t * grid_h * grid_w / merge^2 of them are in the ids.
            image_tokens = int(expected["image_grid_thw"].prod()) // 4
            assert features.input_ids.count(official.base.config.image_token_id) == image_tokens
            assert MIN_PIXELS // 784 <= image_tokens <= MAX_PIXELS // 784
            # Queued as uint8 at the final size, not as float patches.
            assert features.image.mode == "RGB" and features.image.width * features.image.height <= MAX_PIXELS


def test_over_long_text_is_shortened_and_keeps_the_pooled_end_token(provider: MultimodalEmbeddingProvider) -> None:
    builder = provider.builder
    long_text = " ".join(["the cat sits on the mat"] * 400)
    for image in (None, fetch_image(IMAGES[0])):
        features = builder.build(long_text, image, "You are a helpful assistant.")
        assert features.cost <= builder.max_length
        suffix = builder.tokenizer("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")["input_ids"]
        assert features.input_ids[-len(suffix) :] == suffix
        assert features.cost >= builder.max_length - 8  # shortened, not emptied


# --- provider == official, fp32, alone and in a batch -----------------------------------------------------
async def test_text_documents_equal_official(provider: MultimodalEmbeddingProvider, official: OfficialGme) -> None:
    expected = official.embed(TEXTS, [None] * len(TEXTS), is_query=False)
    assert_close(await provider.embed(TEXTS), expected, 1e-5)
    for i, text in enumerate(TEXTS):
        assert_close(await provider.embed([text]), expected[i : i + 1], 1e-5)


async def test_text_queries_use_the_configured_or_given_instruction(
    provider: MultimodalEmbeddingProvider, official: OfficialGme
) -> None:
    configured = official.embed(TEXTS, [None] * 3, is_query=True, instruction=QUERY_INSTRUCTION)
    assert_close(await provider.embed(TEXTS, input_type="query"), configured, 1e-5)
    given = official.embed(TEXTS, [None] * 3, is_query=True, instruction="Retrieve a photo.")
    assert_close(await provider.embed(TEXTS, input_type="query", instruction="Retrieve a photo."), given, 1e-5)
    assert np.abs(given - configured).max() > 1e-3
    # Documents ignore any instruction (official: is_query=False always uses the default one).
    documents = await provider.embed(TEXTS, input_type="document", instruction="Retrieve a photo.")
    assert_close(documents, official.embed(TEXTS, [None] * 3, is_query=False), 1e-5)


async def test_images_equal_official(provider: MultimodalEmbeddingProvider, official: OfficialGme) -> None:
    expected = official.embed([None] * len(IMAGES), IMAGES, is_query=False)
    assert_close(await provider.embed_images(IMAGES), expected, 1e-5)
    for i, image in enumerate(IMAGES):
        assert_close(await provider.embed_images([image]), expected[i : i + 1], 1e-5)
    queries = official.embed([None] * len(IMAGES), IMAGES, is_query=True, instruction=QUERY_INSTRUCTION)
    assert_close(await provider.embed_images(IMAGES, input_type="query"), queries, 1e-5)


async def test_fused_pairs_equal_official(provider: MultimodalEmbeddingProvider, official: OfficialGme) -> None:
    expected = official.embed(TEXTS, IMAGES, is_query=False)
    assert_close(await provider.embed_fused(TEXTS, IMAGES), expected, 1e-5)
    for i in range(3):
        assert_close(await provider.embed_fused([TEXTS[i]], [IMAGES[i]]), expected[i : i + 1], 1e-5)
    # Fused differs from either part alone.
    assert np.abs(expected - official.embed(TEXTS, [None] * 3, is_query=False)).max() > 1e-3


async def test_concurrent_modalities_match_and_never_share_a_batch(
    provider: MultimodalEmbeddingProvider, official: OfficialGme
) -> None:
    groups: dict[int, str] = {}
    batches: list[set[str]] = []
    submit, collate = provider.batcher.submit, provider.runner.collate

    async def spy_submit(items):
        groups.update({id(item.payload): item.group for item in items})
        return await submit(items)

    def spy_collate(payloads):
        batches.append({groups[id(p)] for p in payloads})
        return collate(payloads)

    provider.batcher.submit, provider.runner.collate = spy_submit, spy_collate
    texts, images, fused = await asyncio.gather(
        provider.embed(TEXTS), provider.embed_images(IMAGES), provider.embed_fused(TEXTS, IMAGES)
    )
    assert_close(texts, official.embed(TEXTS, [None] * 3, is_query=False), 1e-5)
    assert_close(images, official.embed([None] * 3, IMAGES, is_query=False), 1e-5)
    assert_close(fused, official.embed(TEXTS, IMAGES, is_query=False), 1e-5)
    assert batches and all(len(kinds) == 1 for kinds in batches)
    assert set().union(*batches) == {"text", "image", "fused"}


async def test_float16_is_within_5e_3_of_the_float32_recipe(tiny_qwen2vl_dir: Path, official: OfficialGme) -> None:
    provider = MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir, dtype="float16"))
    try:
        assert_close(await provider.embed(TEXTS), official.embed(TEXTS, [None] * 3, is_query=False), 5e-3)
        assert_close(await provider.embed_images(IMAGES), official.embed([None] * 3, IMAGES, is_query=False), 5e-3)
        assert_close(await provider.embed_fused(TEXTS, IMAGES), official.embed(TEXTS, IMAGES, is_query=False), 5e-3)
    finally:
        await provider.close()


async def test_rows_are_unit_vectors_of_the_model_width(provider: MultimodalEmbeddingProvider) -> None:
    vectors = await provider.embed_images(IMAGES)
    assert provider.embedding_dim == 64  # the tiny fixture's hidden size
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert (await provider.embed([])).shape == (0, 64)
    assert (await provider.embed_images([])).shape == (0, 64)
    assert (await provider.embed_fused([], [])).shape == (0, 64)


# --- contract and errors ----------------------------------------------------------------------------------
async def test_bad_inputs_raise_typed_errors(provider: MultimodalEmbeddingProvider) -> None:
    with pytest.raises(InvalidImageError, match="image 1: cannot decode"):
        await provider.embed_images([IMAGES[0], b"garbage"])
    with pytest.raises(InvalidRequestError, match="2 texts and 1 images"):
        await provider.embed_fused(TEXTS[:2], IMAGES[:1])
    with pytest.raises(InvalidInputTypeError, match="texts\\[1\\]"):
        await provider.embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="dimensions"):
        await provider.embed(TEXTS, dimensions=32)
    with pytest.raises(InvalidImageError, match="ALLOW_IMAGE_URLS"):
        await provider.embed_images(["https://example.invalid/cat.png"])
    with pytest.raises(InvalidImageError, match="image 0: unsupported type NoneType"):
        await provider.embed_fused(["a"], [None])
    with pytest.raises(InvalidInputTypeError, match="texts must be a list"):
        await provider.embed("a single string")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="input_type='passage'"):
        await provider.embed_images(IMAGES[:1], input_type="passage")  # type: ignore[arg-type]
    # Still serving afterwards.
    assert (await provider.embed_images(IMAGES[:1])).shape == (1, 64)


async def test_preprocessing_runs_off_the_event_loop(provider: MultimodalEmbeddingProvider) -> None:
    threads: list[threading.Thread] = []
    build = provider.builder.build

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return build(*args, **kwargs)

    provider.builder.build = spy
    await provider.embed_fused(TEXTS[:1], IMAGES[:1])
    assert threads and all(t is not threading.main_thread() for t in threads)


async def test_warmup_runs_an_image_at_the_max_pixel_size(tiny_qwen2vl_dir: Path) -> None:
    provider = MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir))
    seen: list[int] = []
    forward = provider.runner.forward

    def spy(batch):
        if "image_grid_thw" in batch:
            seen.extend(int(g.prod()) // 4 for g in batch["image_grid_thw"])
        return forward(batch)

    provider.runner.forward = spy
    try:
        await provider.warmup()
        assert seen and max(seen) == MAX_PIXELS // 784
        info = provider.info().as_dict()
        assert info["dimension"] == 64 and info["device"] == "cpu" and info["dtype"] == "float32"
    finally:
        await provider.close()


def test_max_length_below_the_largest_image_fails_at_start(tiny_qwen2vl_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="MULTIMODAL_EMBEDDING_MAX_LENGTH"):
        MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir, max_length=32))


def test_a_gpu_device_on_a_machine_without_one_fails_at_start(tiny_qwen2vl_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="MULTIMODAL_EMBEDDING_DEVICE=cuda:0"):
        MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir, device="cuda:0"))


async def test_auto_budget_and_worst_case_probe_on_cpu(tiny_qwen2vl_dir: Path) -> None:
    provider = MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir, max_batch_tokens="auto", max_length=256))
    try:
        await provider.warmup()
        # CPU: auto = MULTIMODAL_EMBEDDING_AUTO_BATCH_TOKENS_LIMIT, capped at max_batch_size x max_length.
        assert provider.batcher.max_batch_tokens == 8 * 256
        assert provider.info().as_dict()["budget_source"] == "auto (cpu default)"
        # The measurement probe: an image at MAX_PIXELS plus text, exactly `tokens` long.
        worst = provider._synthetic_input(256)
        assert 250 <= worst.cost <= 256
        assert worst.image is not None and provider.builder.image_tokens(worst.image) == MAX_PIXELS // 784
        short = provider._synthetic_input(40)  # no room for an image of MIN_PIXELS: text only
        assert short.image is None and short.cost <= 40
        await provider.batcher.run_exclusive(lambda: provider._probe_forward(2, 256))
    finally:
        await provider.close()


async def test_non_finite_output_is_an_error_and_the_provider_recovers(
    provider: MultimodalEmbeddingProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backend.providers.multimodal as module

    real = module.embed_batch

    def poisoned(model, batch, device):
        vectors = real(model, batch, device).clone()
        vectors[0, 0] = float("nan")
        return vectors

    monkeypatch.setattr(module, "embed_batch", poisoned)
    with pytest.raises(NonFiniteOutputError, match="NaN/Inf"):
        await provider.embed(TEXTS)
    monkeypatch.setattr(module, "embed_batch", real)
    assert np.isfinite(await provider.embed(TEXTS)).all()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"embedding_dim": 1536}, "EMBEDDING_DIM=1536, but .* gives 64-wide"), ({"pooling": "mean"}, "POOLING=mean")],
)
def test_settings_that_contradict_gme_fail_at_start(tiny_qwen2vl_dir: Path, overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        MultimodalEmbeddingProvider(make_config(tiny_qwen2vl_dir, **overrides))


async def test_the_factory_builds_it_from_settings_with_the_declared_width(tiny_qwen2vl_dir: Path) -> None:
    provider = model_factory.create_multimodal_provider(make_config(tiny_qwen2vl_dir, embedding_dim=64))
    try:
        assert isinstance(provider, MultimodalEmbeddingProvider)
        assert (await provider.embed(["x"])).shape == (1, 64)
    finally:
        await provider.close()
    assert model_factory.create_multimodal_provider(make_config(tiny_qwen2vl_dir, enabled=False)) is None


@pytest.mark.gpu
async def test_cuda_float16_with_a_measured_budget_matches_the_recipe(
    tiny_qwen2vl_dir: Path, official: OfficialGme
) -> None:
    provider = MultimodalEmbeddingProvider(
        make_config(tiny_qwen2vl_dir, device="cuda:0", dtype="float16", max_batch_tokens="auto")
    )
    try:
        await provider.warmup()  # measures the activation cost with the worst-case image+text probe
        assert provider.info().as_dict()["budget_source"] == "auto (measured)"
        assert provider.batcher.max_batch_tokens >= provider.config.max_length
        for got, expected in [
            (await provider.embed(TEXTS), official.embed(TEXTS, [None] * 3, is_query=False)),
            (await provider.embed_images(IMAGES), official.embed([None] * 3, IMAGES, is_query=False)),
            (await provider.embed_fused(TEXTS, IMAGES), official.embed(TEXTS, IMAGES, is_query=False)),
        ]:
            assert_close(got, expected, 5e-3)
    finally:
        await provider.close()
