"""The seed project's design, reimplemented as the benchmarks' baseline.

A batcher that collects up to 32 requests, waits up to 100 ms after the first for more, then calls
sentence-transformers `encode(texts, batch_size=128)` on the concatenated texts, one batch at a time (the encode
runs in a worker thread so the event loop keeps accepting requests, as the seed's FastAPI app did).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np

MAX_REQUESTS = 32
MAX_WAIT_S = 0.100
ENCODE_BATCH_SIZE = 128


def load_sentence_transformer(path: str, device: str, dtype: str, attn_implementation: str = "sdpa") -> Any:
    """The checkpoint as the seed loaded it: SentenceTransformer with left padding, in `dtype` on `device`."""
    import torch
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        path, device=device,
        model_kwargs={"torch_dtype": getattr(torch, dtype), "attn_implementation": attn_implementation},
        processor_kwargs={"padding_side": "left"},
    )


class SeedBatcher:
    """Collects up to `max_requests` requests (waiting up to `max_wait_s`), then one `encode` per batch."""

    def __init__(self, model: Any, *, max_requests: int = MAX_REQUESTS, max_wait_s: float = MAX_WAIT_S,
                 batch_size: int = ENCODE_BATCH_SIZE) -> None:
        self.model = model
        self.max_requests = max_requests
        self.max_wait_s = max_wait_s
        self.batch_size = batch_size
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self.batches = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` (float32, one row per text), through the seed's batching."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_requests:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            texts = [t for request, _ in batch for t in request]
            try:
                vectors = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:  # the seed failed every request of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for request, future in batch:
                if not future.done():
                    future.set_result(vectors[start:start + len(request)])
                start += len(request)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
