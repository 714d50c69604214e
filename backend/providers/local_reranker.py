"""LocalRerankerProvider: Qwen3-Reranker (yes/no head) or a single-logit classifier on this machine's GPU/CPU.

Contract (see BaseRerankerProvider):
- `rerank(query, documents, instruction=None)` returns one float score in (0, 1) per document, in input order.
  Empty `documents` gives []; an empty query, or more than RERANKER_MAX_DOCUMENTS documents, raises
  InvalidRequestError (HTTP 422) naming the limit and the value; non-strings raise InvalidInputTypeError.
- Qwen3-Reranker is scored exactly as its model card does (see `reranker_runners`); the instruction is
  RERANKER_INSTRUCTION unless the call gives one. Cross-encoders take no instruction.
- Which scoring path serves the checkpoint comes from its own config through `RERANKER_DISPATCH`; a checkpoint
  whose scoring head would be randomly initialised is refused at construction (ConfigurationError).
- Tokenisation runs in a worker thread; forward passes run through the shared BatchProcessor (token budget
  RERANKER_MAX_BATCH_TOKENS counted on the full prompt, at most RERANKER_BATCH_SIZE documents per batch), in the
  device's one worker thread. Identical documents are scored once, so duplicates get identical scores.
- Device, dtype and attention are checked before loading and verified after (`backend.providers.device`);
  `warmup()` plans the token budget ("auto" is measured on a GPU) with a full-budget forward, then scores one
  real prompt. A NaN/Inf logit fails the request with NonFiniteOutputError naming the remedy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from backend.config import RerankerConfig
from backend.errors import ConfigurationError, InvalidInputTypeError, InvalidRequestError
from backend.providers.base import BaseRerankerProvider, ProviderInfo
from backend.providers.batching import BatchProcessor, WorkItem
from backend.providers.device import (
    BudgetPlan,
    CudaProbe,
    model_memory_bytes,
    non_finite_error,
    plan_batch_tokens,
    resolve_device_spec,
    verify_loaded_model,
)
from backend.providers.model_source import resolve_model_dir
from backend.providers.reranker_runners import Encoded, load_reranker
from backend.providers.token_budget import check_budget_holds_max_length

logger = logging.getLogger(__name__)

WARMUP_QUERY = "warm-up query"
WARMUP_DOCUMENT = "yes "  # repeated to fill a prompt of RERANKER_MAX_LENGTH tokens


class LocalRerankerProvider(BaseRerankerProvider):
    """Reranker served in-process by transformers; one instance per device."""

    def __init__(self, config: RerankerConfig, *, probe: CudaProbe | None = None) -> None:
        """Check the placement, load the checkpoint along its dispatch path and set up the batcher.

        Raises ConfigurationError (DeviceError) for a device/dtype/attention that cannot run here, a checkpoint
        that cannot be loaded or fits no scoring path, or a token budget below RERANKER_MAX_LENGTH.
        """
        self.config = config
        self._prefix = config.env_prefix()
        self.spec = resolve_device_spec(config, probe)
        source = str(resolve_model_dir(config))  # a local folder; the hub cache for a bare MODEL_NAME
        try:
            self._loaded = load_reranker(
                source,
                max_length=config.max_length,
                device=self.spec.device,
                torch_dtype=self.spec.dtype,
                attn_implementation=self.spec.attn_implementation,
                non_finite=self._non_finite,
            )
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot load the reranker '{source}' ({self._prefix}MODEL_PATH / {self._prefix}MODEL_NAME): {exc}",
                source=source,
            ) from exc
        verify_loaded_model(self._loaded.model, self.spec, prefix=self._prefix)
        if isinstance(config.max_batch_tokens, int):
            check_budget_holds_max_length(config.max_batch_tokens, config.max_length, self._prefix)
            budget = config.max_batch_tokens
        else:
            budget = config.max_length  # until warmup() plans the "auto" budget
        self._batcher: BatchProcessor[Encoded, float] = BatchProcessor.from_config(
            self._loaded.runner, config, name="reranker", max_batch_tokens=budget
        )
        self._plan: BudgetPlan | None = None
        self._memory_bytes = model_memory_bytes(self._loaded.model)
        logger.info("reranker %s loaded on %s via the %s path", source, self.spec.describe(), self._loaded.path.name)

    @property
    def path_name(self) -> str:
        """The dispatch path serving the checkpoint (qwen3_yes_no, qwen3_seq_cls or cross_encoder)."""
        return self._loaded.path.name

    @property
    def max_batch_tokens(self) -> int:
        return self._batcher.max_batch_tokens

    # --- contract -------------------------------------------------------------------------------------------
    async def rerank(
        self, query: str, documents: list[str], *, instruction: str | None = None, **kwargs: Any
    ) -> list[float]:
        """One score in (0, 1) per document, in input order; higher = more relevant."""
        self._check_request(query, documents, instruction)
        if not documents:
            return []
        unique = list(dict.fromkeys(documents))
        builder = self._loaded.builder
        if instruction is None and builder.uses_instruction:
            instruction = self.config.instruction
        payloads = await asyncio.to_thread(builder.build, query, unique, instruction)
        scores = await self._batcher.submit([WorkItem(p, len(p["input_ids"])) for p in payloads])
        by_document = dict(zip(unique, scores, strict=True))
        return [by_document[doc] for doc in documents]

    async def warmup(self) -> None:
        """Plan the token budget (a full-budget forward on a GPU), then score one real prompt end to end."""
        await self._batcher.start()
        warm = await asyncio.to_thread(self._warm_payload)
        self._plan = await plan_batch_tokens(
            self._batcher,
            self.spec,
            self.config,
            max_length=self.config.max_length,
            probe_forward=lambda rows, tokens: self._probe_forward(warm, rows, tokens),
            run_warmup=self.config.warmup,
        )
        if self.config.warmup:
            await self.rerank(WARMUP_QUERY, ["warm-up document"])

    def info(self) -> ProviderInfo:
        plan = self._plan.as_dict() if self._plan is not None else {"max_batch_tokens": self.max_batch_tokens}
        return self.spec.provider_info(
            model=self.config.model_name,
            dimension=None,
            memory_bytes=self._memory_bytes,
            extra={
                "scoring": self._loaded.path.name,
                "max_length": self.config.max_length,
                "max_batch_size": self.config.max_batch_size,
                "max_documents": self.config.max_documents,
                **plan,
            },
        )

    async def close(self) -> None:
        """Finish accepted work and stop the device worker. Idempotent."""
        await self._batcher.close()
        if self.spec.is_cuda:
            torch.cuda.empty_cache()

    # --- internals ------------------------------------------------------------------------------------------
    def _check_request(self, query: Any, documents: Any, instruction: Any) -> None:
        if not isinstance(query, str):
            raise InvalidInputTypeError(f"query must be a string, got {type(query).__name__}")
        if not query.strip():
            raise InvalidRequestError("query must not be empty", received=query)
        if not isinstance(documents, Sequence) or isinstance(documents, str):
            raise InvalidInputTypeError(f"documents must be a list of strings, got {type(documents).__name__}")
        for index, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise InvalidInputTypeError(
                    f"documents[{index}] must be a string, got {type(doc).__name__}", index=index
                )
        limit = self.config.max_documents
        if len(documents) > limit:
            raise InvalidRequestError(
                f"documents has {len(documents)} items; the limit is {limit} ({self._prefix}MAX_DOCUMENTS)",
                limit=limit,
                received=len(documents),
                variable=f"{self._prefix}MAX_DOCUMENTS",
            )
        if instruction is not None and not isinstance(instruction, str):
            raise InvalidInputTypeError(f"instruction must be a string, got {type(instruction).__name__}")

    def _non_finite(self) -> BaseException:
        return non_finite_error(model_name=self.config.model_name, dtype=self.spec.dtype_name, prefix=self._prefix)

    def _warm_payload(self) -> Encoded:
        """A real prompt of RERANKER_MAX_LENGTH tokens (the document is truncated to fit)."""
        builder = self._loaded.builder
        instruction = self.config.instruction if builder.uses_instruction else None
        document = WARMUP_DOCUMENT * 2 * self.config.max_length
        return builder.build(WARMUP_QUERY, [document], instruction)[0]

    def _probe_forward(self, warm: Encoded, rows: int, tokens: int) -> None:
        """A synthetic forward of rows x tokens (memory measurement / full-budget warm-up), device thread."""
        payload = {key: ids[-tokens:] for key, ids in warm.items()}
        runner = self._loaded.runner
        runner.forward(runner.collate([payload] * rows))
