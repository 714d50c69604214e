"""LocalEmbeddingProvider (EMBEDDING_PROVIDER=local_gpu): text embeddings from a model on this machine's GPU or CPU.

Serves Qwen3-Embedding (0.6B / 4B / 8B) with the official recipe and any sentence-transformers checkpoint (the
embedded default is the packaged all-MiniLM-L6-v2 on the CPU). Life cycle:

1. construction: start-up checks (device, kernels, dtype, attention), the model is loaded and verified (dtype,
   attention and device really in effect; memory logged); an explicit budget below MAX_LENGTH is refused;
2. `warmup()`: the token budget is planned (measured on a GPU when "auto"; an explicit GPU budget is proven by a
   full-size forward whose out-of-memory names EMBEDDING_MAX_BATCH_TOKENS), then one real request runs;
3. `embed()`: texts are formatted (query instruction) and tokenised off the event loop into WorkItems
   (cost = tokens), batched by the BatchProcessor with all concurrent traffic, pooled on the device; rows are
   sliced to `dimensions` (Matryoshka) and only then L2-normalised in fp32;
4. `close()`: the batcher drains and the model is released.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import numpy as np
import torch

from backend.config import ModelConfig
from backend.errors import ConfigurationError, InvalidInputTypeError, InvalidRequestError
from backend.providers.base import BaseEmbeddingProvider, InputType, ProviderInfo
from backend.providers.batching import BatchProcessor
from backend.providers.device import (
    BudgetPlan,
    CudaProbe,
    model_memory_bytes,
    plan_batch_tokens,
    resolve_device_spec,
    verify_loaded_model,
)
from backend.providers.embedding_runners import EmbeddingRunner, load_embedding_runner
from backend.providers.model_source import resolve_model_dir

logger = logging.getLogger(__name__)

MIN_DIMENSIONS = 32  # Qwen3-Embedding's Matryoshka range starts here
_INLINE_ROWS = 64  # results up to this many rows are sliced/normalised on the loop, larger ones in a thread
# Requests up to this many characters are tokenised on the loop (~0.1 ms): a thread hop costs more than the work
# and adds latency to the single-query path. Larger requests are tokenised in a worker thread.
_INLINE_TOKENIZE_CHARS = 4096


def normalise_rows(rows: list[np.ndarray], dimensions: int) -> np.ndarray:
    """Stack, slice to `dimensions`, then L2-normalise in fp32 (F.normalize semantics, eps 1e-12)."""
    matrix = np.stack(rows).astype(np.float32, copy=False)[:, :dimensions]
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class LocalEmbeddingProvider(BaseEmbeddingProvider):
    """Local transformers / sentence-transformers embedding model behind a token-budget batcher."""

    def __init__(self, config: ModelConfig, *, probe: CudaProbe | None = None) -> None:
        """Check the device, load and verify the model. `probe` injects the CUDA facts (tests)."""
        self.config = config
        self.prefix = config.env_prefix()
        self.spec = resolve_device_spec(config, probe)
        self.model_dir = resolve_model_dir(config)
        self.runner: EmbeddingRunner = load_embedding_runner(self.model_dir, self.spec, config)
        verify_loaded_model(self.runner.model, self.spec, prefix=self.prefix, config=self.runner.hf_config)
        self.memory_bytes = model_memory_bytes(self.runner.model)
        self.max_length = min(config.max_length, self.runner.max_positions)
        if self.max_length < config.max_length:
            logger.info(
                "%sMAX_LENGTH=%d exceeds what %s takes (%d tokens): inputs are truncated to %d",
                self.prefix, config.max_length, config.model_name, self.runner.max_positions, self.max_length,
            )
        self.native_dim = self.runner.hidden_size
        self._dim = self._check_dimensions(
            config.embedding_dim, setting=f"{self.prefix}EMBEDDING_DIM", error=ConfigurationError
        )
        budget = config.max_batch_tokens
        if budget != "auto" and budget < self.max_length:
            raise ConfigurationError(
                f"{self.prefix}MAX_BATCH_TOKENS={budget} cannot hold one input of {self.max_length} tokens "
                f"({self.prefix}MAX_LENGTH={config.max_length}, model limit {self.runner.max_positions}): raise "
                f"{self.prefix}MAX_BATCH_TOKENS or lower {self.prefix}MAX_LENGTH."
            )
        provisional = budget if budget != "auto" else max(config.auto_batch_tokens_limit, self.max_length)
        self.processor: BatchProcessor[Any, np.ndarray] = BatchProcessor.from_config(
            self.runner, config, name="embedding", max_batch_tokens=provisional
        )
        self.plan: BudgetPlan | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._closed = False
        logger.info(
            "loaded %s (%s) from %s on %s: %.1f MiB, dimension %d, max length %d",
            config.model_name, self.runner.kind, self.model_dir, self.spec.describe(),
            self.memory_bytes / 2**20, self._dim, self.max_length,
        )

    # --- BaseEmbeddingProvider --------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self._dim

    @property
    def max_token_size(self) -> int:
        return self.max_length

    async def warmup(self) -> None:
        """Plan the token budget (proving it on a GPU) and run one real request through the whole path."""
        await self._ensure_ready()
        if self.config.warmup:
            await self.embed(["warm-up"], input_type="query")

    async def embed(
        self,
        texts: list[str],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 (len(texts), dimensions or embedding_dim), L2-normalised, row i for texts[i].

        Queries get the instruction (`instruction`, else EMBEDDING_INSTRUCTION); documents are embedded raw unless
        an `instruction` is passed explicitly. Inputs longer than the max length are truncated (the end token is
        kept). Raises InvalidInputTypeError (a TypeError) for non-strings, InvalidRequestError for a bad
        input_type or dimensions, OverloadedError when the queue is full.
        """
        texts = self._check_texts(texts)
        if input_type not in ("query", "document"):
            raise InvalidRequestError(f"input_type must be 'query' or 'document', got {input_type!r}")
        dims = self._dim if dimensions is None else self._check_dimensions(dimensions, setting="dimensions")
        if not texts:
            return np.zeros((0, dims), dtype=np.float32)
        await self._ensure_ready()
        formatted = self.runner.format(texts, input_type, instruction)
        items = None
        if sum(len(text) for text in formatted) <= _INLINE_TOKENIZE_CHARS:
            items = self.runner.try_tokenize(formatted, self.max_length)
        if items is None:
            items = await asyncio.to_thread(self.runner.tokenize, formatted, self.max_length)
        rows = await self.processor.submit(items)
        if len(rows) <= _INLINE_ROWS:
            return normalise_rows(rows, dims)
        return await asyncio.to_thread(normalise_rows, rows, dims)

    async def count_tokens(self, texts: list[str]) -> int | None:
        """Tokens the texts occupy as documents, after truncation (the `usage` of /v1/embeddings)."""
        texts = self._check_texts(texts)
        if not texts:
            return 0
        items = await asyncio.to_thread(self.runner.tokenize, list(texts), self.max_length)
        return sum(item.cost for item in items)

    def info(self) -> ProviderInfo:
        return self.spec.provider_info(
            model=self.config.model_name,
            dimension=self._dim,
            memory_bytes=self.memory_bytes,
            extra={
                "runner": self.runner.kind,
                "pooling": self.runner.pooling,
                "max_length": self.max_length,
                "max_batch_tokens": self.processor.max_batch_tokens,
                "budget_source": self.plan.source if self.plan else "not planned yet",
                "max_batch_size": self.processor.max_batch_size,
                "queue_depth": self.processor.queue_depth,
            },
        )

    async def close(self) -> None:
        """Finish accepted work, then release the model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.processor.close()
        del self.runner.model
        gc.collect()
        if self.spec.is_cuda:
            torch.cuda.empty_cache()

    # --- helpers ----------------------------------------------------------------------------------------------
    async def _ensure_ready(self) -> None:
        if self.plan is not None:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self.plan is None:
                self.plan = await plan_batch_tokens(
                    self.processor,
                    self.spec,
                    self.config,
                    max_length=self.max_length,
                    probe_forward=self.runner.probe_forward,
                    run_warmup=self.config.warmup,
                )

    def _check_dimensions(
        self, dimensions: int | None, *, setting: str, error: type[Exception] = InvalidRequestError
    ) -> int:
        if dimensions is None:
            return self.native_dim
        if isinstance(dimensions, bool) or not isinstance(dimensions, int):
            raise InvalidInputTypeError(f"{setting} must be an integer, got {type(dimensions).__name__}")
        if not MIN_DIMENSIONS <= dimensions <= self.native_dim:
            raise error(
                f"{setting}={dimensions} is outside {MIN_DIMENSIONS}..{self.native_dim} "
                f"(the width of {self.config.model_name})",
                limit=self.native_dim,
                received=dimensions,
            )
        return dimensions

    @staticmethod
    def _check_texts(texts: Any) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, list | tuple):
            raise InvalidInputTypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputTypeError(f"texts[{index}] must be a string, got {type(text).__name__}")
        return list(texts)
