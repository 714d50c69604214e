"""LocalEmbeddingProvider on a tiny random Qwen3-Embedding: fidelity to the official recipe, invariance under
batching and concurrency, Matryoshka, truncation, input errors, queue behaviour, failures, shutdown, refusals.

`official_recipe` below is the Qwen3-Embedding README code (tokenizer with padding_side='left', padding=True,
truncation=True, max_length; README's last_token_pool; F.normalize), written out independently of the provider.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from backend.api.state import Services
from backend.config import EmbeddingConfig, Settings
from backend.errors import (
    ConfigurationError,
    DeviceError,
    InvalidInputTypeError,
    InvalidRequestError,
    ModelExecutionError,
    NonFiniteOutputError,
    OverloadedError,
    ShuttingDownError,
)
from backend.main import create_app
from backend.providers.device import CudaProbe
from backend.providers.local_embedding import LocalEmbeddingProvider

TASK = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = ["what is the capital of france", "cat", "stock markets fell today?", ""]
DOCS = ["paris is the capital of france", "a kitten sits on the mat " * 5, "the red apple", "yes"]
module_loop = pytest.mark.asyncio(loop_scope="module")


def config(model_dir: Path, **kw: Any) -> EmbeddingConfig:
    return EmbeddingConfig(_env_file=None, model_path=str(model_dir), model_name="tiny-qwen3-embedding", **kw)


def last_token_pool(last_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Verbatim from the Qwen3-Embedding README."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def official_recipe(model_dir: Path, texts: list[str], max_length: int = 8192, normalize: bool = True) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        pooled = last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    return (F.normalize(pooled, p=2, dim=1) if normalize else pooled).numpy()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(tiny_qwen3_embedding_dir: Path):
    instance = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, max_batch_size=64))
    await instance.warmup()
    yield instance
    await instance.close()


async def hold_device(provider: LocalEmbeddingProvider) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Occupy the device thread until the returned event is set (the batcher then sees a busy device)."""
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    future = asyncio.ensure_future(provider.processor.run_exclusive(hold))
    assert await asyncio.to_thread(started.wait, 5)
    return release, future


async def settle(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


# --- fidelity ---------------------------------------------------------------------------------------------
@module_loop
async def test_queries_and_documents_match_the_official_recipe(provider, tiny_qwen3_embedding_dir) -> None:
    got_q = await provider.embed(QUERIES, input_type="query")
    want_q = official_recipe(tiny_qwen3_embedding_dir, [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES])
    got_d = await provider.embed(DOCS)
    want_d = official_recipe(tiny_qwen3_embedding_dir, DOCS)
    assert got_q.dtype == np.float32 and got_q.shape == (4, 64)
    np.testing.assert_allclose(got_q, want_q, atol=1e-5)
    np.testing.assert_allclose(got_d, want_d, atol=1e-5)
    assert not np.allclose(got_q[0], (await provider.embed(QUERIES[:1]))[0], atol=1e-3)  # instruction matters
    custom = await provider.embed(["dog"], input_type="query", instruction="Retrieve semantically similar text")
    want = official_recipe(tiny_qwen3_embedding_dir, ["Instruct: Retrieve semantically similar text\nQuery:dog"])
    np.testing.assert_allclose(custom, want, atol=1e-5)


@module_loop
async def test_matryoshka_slices_then_normalises(provider, tiny_qwen3_embedding_dir) -> None:
    pooled = official_recipe(tiny_qwen3_embedding_dir, DOCS, normalize=False)
    for dims in (32, 48):
        got = await provider.embed(DOCS, dimensions=dims)
        want = F.normalize(torch.from_numpy(pooled[:, :dims]), p=2, dim=1).numpy()
        assert got.shape == (4, dims)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    for bad in (16, 65):
        with pytest.raises(InvalidRequestError, match=f"dimensions={bad} is outside 32..64"):
            await provider.embed(DOCS, dimensions=bad)


def test_configured_dimension_is_the_default_width(tiny_qwen3_embedding_dir) -> None:
    narrow = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, embedding_dim=48))
    assert narrow.embedding_dim == 48 and narrow.info().dimension == 48
    with pytest.raises(ConfigurationError, match="EMBEDDING_EMBEDDING_DIM=128 is outside 32..64"):
        LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, embedding_dim=128))


@module_loop
async def test_ten_times_the_max_length_is_truncated_and_keeps_the_end_token(tiny_qwen3_embedding_dir) -> None:
    short = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, max_length=32))
    long_text = "the cat sits on the mat and the dog " * 40  # ~10x 32 tokens
    (item,) = short.runner.tokenize([long_text], short.max_length)
    assert item.cost == 32 and item.payload[-1] == short.runner.end_id
    got = await short.embed([long_text, "tiny"])
    np.testing.assert_allclose(got, official_recipe(tiny_qwen3_embedding_dir, [long_text, "tiny"], 32), atol=1e-5)
    assert await short.count_tokens([long_text, "tiny"]) == 32 + len(short.runner.tokenize(["tiny"], 32)[0].payload)
    await short.close()


# --- invariance and concurrency -----------------------------------------------------------------------------
def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "cat dog kitten mat rug stock markets fell today paris capital france red apple banana".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@module_loop
async def test_alone_equals_mixed_batch_and_concurrent_traffic(provider) -> None:
    texts = _corpus(64, seed=1)
    alone = np.concatenate([await provider.embed([t]) for t in texts[:6]])
    mixed = await provider.embed(texts)
    concurrent = await asyncio.gather(*(provider.embed([t]) for t in texts))
    np.testing.assert_allclose(mixed[:6], alone, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(concurrent)[:6], alone, atol=1e-5)


@module_loop
async def test_float16_alone_equals_batch(tiny_qwen3_embedding_dir) -> None:
    half = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, dtype="float16"))
    assert half.info().dtype == "float16"
    texts = _corpus(16, seed=2)
    alone = np.concatenate([await half.embed([t]) for t in texts[:4]])
    batch = await half.embed(texts)
    np.testing.assert_allclose(batch[:4], alone, atol=5e-3)
    await half.close()


@module_loop
async def test_500_concurrent_calls_get_their_own_rows_in_fewer_forwards(provider) -> None:
    pool = _corpus(40, seed=3)
    reference = dict(zip(pool, await provider.embed(pool), strict=True))
    rng = random.Random(4)
    calls = [[rng.choice(pool) for _ in range(rng.randint(1, 8))] for _ in range(500)]
    before = provider.processor.forward_count
    results = await asyncio.gather(*(provider.embed(texts) for texts in calls))
    forwards = provider.processor.forward_count - before
    for texts, got in zip(calls, results, strict=True):
        assert got.shape == (len(texts), 64)
        np.testing.assert_allclose(got, np.stack([reference[t] for t in texts]), atol=1e-5)
    assert forwards < len(calls)


# --- input handling ---------------------------------------------------------------------------------------
@module_loop
async def test_empty_inputs_and_bad_types(provider, tiny_qwen3_embedding_dir) -> None:
    empty = await provider.embed([])
    assert empty.shape == (0, 64) and empty.dtype == np.float32
    assert (await provider.embed([], dimensions=32)).shape == (0, 32)
    blank = await provider.embed([""])
    assert blank.shape == (1, 64) and np.isfinite(blank).all()
    # Only the end token: in this random model its embedding row is the zero padding row, hence a zero vector.
    np.testing.assert_allclose(blank, official_recipe(tiny_qwen3_embedding_dir, [""]), atol=1e-6)
    for bad in (["ok", 3], [None], "a string, not a list"):
        with pytest.raises(InvalidInputTypeError) as info:
            await provider.embed(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError) and info.value.status_code == 422
    with pytest.raises(InvalidRequestError, match="input_type"):
        await provider.embed(["x"], input_type="passage")  # type: ignore[arg-type]


# --- queue, cancellation, failures, shutdown --------------------------------------------------------------
@module_loop
async def test_full_queue_raises_overloaded(tiny_qwen3_embedding_dir) -> None:
    small = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, max_queue_items=4))
    await small.warmup()
    release, held = await hold_device(small)
    first = asyncio.create_task(small.embed(["a"]))  # cut at once, waits behind the held device
    await settle(lambda: small.processor._device_busy)
    waiting = asyncio.create_task(small.embed(["b", "c", "d"]))
    await settle(lambda: small.processor.queue_depth == 3)
    with pytest.raises(OverloadedError, match="EMBEDDING_MAX_QUEUE_ITEMS=4") as info:
        await small.embed(["e", "f"])
    assert info.value.status_code == 429
    with pytest.raises(InvalidRequestError, match="more than it holds"):
        await small.embed(list("abcde"))
    app = create_app(services=Services(settings=Settings.load(env_file=os.devnull), embedding=small))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            full = await client.post("/api/embed", json={"texts": ["e", "f"]})
            assert full.status_code == 429 and full.json()["error"]["code"] == "overloaded"
            assert "EMBEDDING_MAX_QUEUE_ITEMS=4" in full.json()["error"]["message"]
            release.set()
            await held
            assert (await first).shape == (1, 64) and (await waiting).shape == (3, 64)
            served = await client.post("/api/embed", json={"texts": ["e", "f"]})  # the queue drained: served again
            assert served.status_code == 200 and len(served.json()["embeddings"]) == 2
    await small.close()


@module_loop
async def test_cancelled_request_never_reaches_the_model(provider, monkeypatch) -> None:
    seen: list[list[int]] = []
    real_forward = provider.runner.forward

    def recording(batch):  # noqa: ANN001, ANN202
        rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        seen.extend(row[mask.bool()].tolist() for row, mask in rows)
        return real_forward(batch)

    monkeypatch.setattr(provider.runner, "forward", recording)
    marker = "banana banana apple red green blue"
    marker_ids = provider.runner.tokenize([marker], provider.max_length)[0].payload
    release, held = await hold_device(provider)
    other = asyncio.create_task(provider.embed(["first"]))
    await settle(lambda: provider.processor._device_busy)
    doomed = asyncio.create_task(provider.embed([marker]))
    await settle(lambda: provider.processor.queue_depth == 1)
    doomed.cancel()
    release.set()
    await held
    assert (await other).shape == (1, 64)
    assert (await provider.embed(["after"])).shape == (1, 64)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert seen and marker_ids not in seen


@module_loop
async def test_failing_batch_fails_its_request_and_the_next_succeeds(provider, monkeypatch) -> None:
    real_forward = provider.runner.forward
    calls = {"n": 0}

    def flaky(batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_forward(batch)

    monkeypatch.setattr(provider.runner, "forward", flaky)
    with pytest.raises(ModelExecutionError, match="illegal memory access") as info:
        await provider.embed(["doomed"])
    assert info.value.status_code == 500 and isinstance(info.value.__cause__, RuntimeError)
    np.testing.assert_allclose(await provider.embed(["doomed"]), await provider.embed(["doomed"]), atol=1e-6)


@module_loop
async def test_nan_row_fails_only_its_request(provider, monkeypatch) -> None:
    real_model = provider.runner.model
    poison = provider.runner.tokenize(["poison apple"], provider.max_length)[0].payload

    def nan_model(input_ids, attention_mask):  # noqa: ANN001, ANN202
        hidden = real_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.clone()
        for row, mask in enumerate(attention_mask):
            if input_ids[row][mask.bool()].tolist() == poison:
                hidden[row] = float("nan")
        return SimpleNamespace(last_hidden_state=hidden)

    monkeypatch.setattr(provider.runner, "model", nan_model)
    release, held = await hold_device(provider)
    first = asyncio.create_task(provider.embed(["first"]))  # cut at once; the device is then busy
    await settle(lambda: provider.processor._device_busy)
    bad = asyncio.create_task(provider.embed(["poison apple", "fine"]))
    good = asyncio.create_task(provider.embed(["also fine"]))
    await settle(lambda: provider.processor.queue_depth == 3)  # both requests wait for one shared batch
    release.set()
    await held
    assert (await first).shape == (1, 64)
    with pytest.raises(NonFiniteOutputError) as info:
        await bad
    assert "tiny-qwen3-embedding" in str(info.value) and "float32" in str(info.value)
    assert np.isfinite(await good).all()


@module_loop
async def test_shutdown_drains_accepted_work_and_refuses_new(tiny_qwen3_embedding_dir) -> None:
    closing_provider = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir))
    await closing_provider.warmup()
    release, held = await hold_device(closing_provider)
    accepted = [asyncio.create_task(closing_provider.embed(["first"]))]
    await settle(lambda: closing_provider.processor._device_busy)
    accepted += [asyncio.create_task(closing_provider.embed([f"text {i}"])) for i in range(3)]
    await settle(lambda: closing_provider.processor.queue_depth == 3)
    closing = asyncio.create_task(closing_provider.close())
    await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDownError):
        await closing_provider.embed(["late"])
    release.set()
    await held
    await closing
    assert [(await task).shape for task in accepted] == [(1, 64)] * 4


# --- info and start-up refusals -----------------------------------------------------------------------------
@module_loop
async def test_small_request_does_not_wait_on_a_busy_tokenizer_on_the_event_loop(provider) -> None:
    """Small requests tokenise inline, but never wait for a tokenizer another thread holds: they go to a thread."""
    expected = await provider.embed(["a cat sits on the mat"])
    assert provider.runner.tokenize_lock.acquire(timeout=5)
    try:
        task = asyncio.ensure_future(provider.embed(["a cat sits on the mat"]))
        await asyncio.sleep(0.05)  # the loop keeps running while the tokenizer is held elsewhere
        assert not task.done()
    finally:
        provider.runner.tokenize_lock.release()
    np.testing.assert_allclose(await task, expected, atol=1e-6)


async def test_info_for_health(provider) -> None:
    info = provider.info().as_dict()
    assert info["provider"] == "local_gpu" and info["model"] == "tiny-qwen3-embedding"
    assert (info["device"], info["dtype"], info["attn_implementation"]) == ("cpu", "float32", "sdpa")
    assert info["dimension"] == 64 and info["memory_bytes"] > 100_000
    assert info["max_batch_tokens"] == 32768 and info["budget_source"] == "auto (cpu default)"
    assert info["runner"] == "qwen3" and info["max_length"] == 512


PASCAL = CudaProbe(True, 1, "12.6", ("sm_61", "sm_70"), ((6, 1),), ("NVIDIA GeForce GTX 1080 Ti",))


@pytest.mark.parametrize(
    ("settings", "probe", "message"),
    [
        ({"device": "cuda:0"}, CudaProbe(False, 0, None, (), (), ()), "CPU-only"),
        ({"device": "cuda:1"}, PASCAL, "EMBEDDING_DEVICE=cuda:1 does not exist"),
        ({"device": "cuda:0", "dtype": "bfloat16"}, PASCAL, "EMBEDDING_DTYPE=bfloat16 needs compute capability 8.0"),
        (
            {"device": "cuda:0"},
            CudaProbe(True, 1, "12.8", ("sm_75", "sm_80", "sm_90"), ((6, 1),), ("NVIDIA GeForce GTX 1080 Ti",)),
            "pip install torch --index-url https://download.pytorch.org/whl/cu126",
        ),
    ],
)
def test_start_up_refusals(tiny_qwen3_embedding_dir, settings, probe, message) -> None:
    with pytest.raises(DeviceError, match=message.replace("(", r"\(")):
        LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, **settings), probe=probe)


def test_model_source_errors(tiny_qwen3_embedding_dir, tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="EMBEDDING_MODEL_PATH=pkg:no_such_package_xyz"):
        LocalEmbeddingProvider(EmbeddingConfig(_env_file=None, model_path="pkg:no_such_package_xyz"))
    with pytest.raises(ConfigurationError, match="is not a model folder"):
        LocalEmbeddingProvider(EmbeddingConfig(_env_file=None, model_path=str(tmp_path)))
    with pytest.raises(ConfigurationError, match="EMBEDDING_MODEL_NAME=nobody/not-cached-model cannot be loaded"):
        LocalEmbeddingProvider(EmbeddingConfig(_env_file=None, model_name="nobody/not-cached-model"))
    with pytest.raises(ConfigurationError, match="EMBEDDING_MAX_BATCH_TOKENS=100 cannot hold one input"):
        LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, max_batch_tokens=100))
    with pytest.raises(ConfigurationError, match="EMBEDDING_POOLING=mean"):
        LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, pooling="mean"))


# --- GPU (skipped without CUDA) -----------------------------------------------------------------------------
@pytest.mark.gpu
@module_loop
async def test_gpu_float16_matches_cpu_and_the_budget_is_measured(tiny_qwen3_embedding_dir) -> None:
    gpu = LocalEmbeddingProvider(config(tiny_qwen3_embedding_dir, device="cuda:0", max_length=256))
    await gpu.warmup()
    info = gpu.info().as_dict()
    assert (info["device"], info["dtype"], info["budget_source"]) == ("cuda:0", "float16", "auto (measured)")
    assert 256 <= info["max_batch_tokens"] <= 32768
    texts = _corpus(24, seed=5)
    got = await gpu.embed(texts)
    alone = np.concatenate([await gpu.embed([t]) for t in texts[:4]])
    np.testing.assert_allclose(got[:4], alone, atol=5e-3)
    np.testing.assert_allclose(got, official_recipe(tiny_qwen3_embedding_dir, texts, 256), atol=5e-3)
    await gpu.close()


@pytest.mark.gpu
def test_gpu_explicit_budget_that_cannot_fit_names_the_setting(tiny_qwen3_embedding_dir) -> None:
    free, _ = torch.cuda.mem_get_info(0)
    tokens = int(free // 64)  # far beyond what fits: 64 bytes of memory per token for activations
    big = LocalEmbeddingProvider(
        config(tiny_qwen3_embedding_dir, device="cuda:0", max_length=512, max_batch_tokens=tokens,
               max_batch_size=tokens // 512, attn_implementation="eager")
    )
    with pytest.raises(ConfigurationError, match=f"EMBEDDING_MAX_BATCH_TOKENS={tokens} does not fit on cuda:0"):
        asyncio.run(big.warmup())
