"""MultimodalEmbeddingProvider: GME-Qwen2-VL text, image and fused text+image embeddings on a local device.

Contract (see BaseMultimodalEmbeddingProvider): `embed(texts)`, `embed_images(images)`, `embed_fused(texts,
images)` are async and return float32 (n, hidden) L2-normalised rows, row i for input i, exactly as the official
GME pipeline computes them (backend/providers/gme.py). Documents use GME's default instruction; queries the
per-call instruction, else MULTIMODAL_EMBEDDING_INSTRUCTION. GME has no Matryoshka: `dimensions` must be the width.

Work flow: image decoding/validation (images.py), resizing and the processor run in a worker thread; each input
becomes one WorkItem whose cost is its token count including image tokens, grouped by modality ("text", "image",
"fused") so a batch never mixes them; the shared BatchProcessor runs the forwards in the device's one thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.config import MultimodalEmbeddingConfig
from backend.errors import ConfigurationError, InvalidInputTypeError, InvalidRequestError
from backend.providers.base import BaseMultimodalEmbeddingProvider, InputType, ProviderInfo
from backend.providers.batching import BatchProcessor, WorkItem
from backend.providers.device import (
    BudgetPlan,
    DeviceSpec,
    model_memory_bytes,
    non_finite_error,
    non_finite_rows,
    plan_batch_tokens,
    resolve_device_spec,
    verify_loaded_model,
)
from backend.providers.gme import (
    DEFAULT_INSTRUCTION,
    GmeFeatures,
    GmeInputBuilder,
    embed_batch,
    resolve_instruction,
)
from backend.providers.images import MAX_RATIO, ImageLoader, fetch_image

logger = logging.getLogger(__name__)

ENV = "MULTIMODAL_EMBEDDING_"


class GmeRunner:
    """BatchRunner of GME: `collate` pads on the CPU, `forward` runs `embed_batch` on the device.

    A row with NaN/Inf (fp16 overflow) fails only its own input with NonFiniteOutputError, never replaced."""

    def __init__(self, model: Any, builder: GmeInputBuilder, spec: DeviceSpec, model_name: str) -> None:
        self.model = model
        self.builder = builder
        self.spec = spec
        self.model_name = model_name

    def collate(self, payloads: list[GmeFeatures]) -> dict[str, torch.Tensor]:
        return self.builder.collate(payloads)

    def forward(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray | BaseException]:
        vectors = embed_batch(self.model, batch, self.spec.torch_device)
        bad = set(non_finite_rows(vectors))
        rows = vectors.cpu().numpy()
        return [
            non_finite_error(model_name=self.model_name, dtype=self.spec.dtype_name, prefix=ENV) if i in bad else row
            for i, row in enumerate(rows)
        ]


class MultimodalEmbeddingProvider(BaseMultimodalEmbeddingProvider):
    """GME-Qwen2-VL served natively by transformers' Qwen2-VL classes (no trust_remote_code)."""

    def __init__(self, config: MultimodalEmbeddingConfig) -> None:
        """Check the placement, load model and processor, and check the settings fit each other (fail fast)."""
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        self.config = config
        self.spec = resolve_device_spec(config)
        source = config.model_source
        try:
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                source, torch_dtype=self.spec.dtype, attn_implementation=self.spec.attn_implementation
            )
            processor = AutoProcessor.from_pretrained(source, use_fast=False)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"Cannot load the GME model from '{source}' ({ENV}MODEL_PATH / {ENV}MODEL_NAME): {exc}"
            ) from exc
        self.model = model.to(self.spec.torch_device).eval()
        verify_loaded_model(self.model, self.spec, prefix=ENV)
        self.memory_bytes = model_memory_bytes(self.model)
        self.builder = GmeInputBuilder(
            processor, max_length=config.max_length, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        self._check_max_length()
        self.images = ImageLoader(
            max_image_pixels=config.max_image_pixels,
            max_image_bytes=config.max_image_bytes,
            allow_urls=config.allow_image_urls,
            url_timeout=config.image_url_timeout,
        )
        self.runner = GmeRunner(self.model, self.builder, self.spec, config.model_name)
        # "auto" is measured in warmup(); until then one input of MAX_LENGTH per batch.
        budget = config.max_batch_tokens if isinstance(config.max_batch_tokens, int) else config.max_length
        self.batcher: BatchProcessor[GmeFeatures, np.ndarray] = BatchProcessor.from_config(
            self.runner, config, name="multimodal", max_batch_tokens=budget
        )
        self.budget: BudgetPlan | None = None
        self._dim = int(self.model.config.hidden_size)
        self._check_geometry()
        logger.info("GME loaded from %s on %s", source, self.spec.describe())

    # --- contract -------------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self._dim

    @property
    def max_token_size(self) -> int:
        return self.config.max_length

    async def embed(
        self,
        texts: list[str],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
        dimensions: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed texts alone (GME's text template)."""
        self._check_dimensions(dimensions)
        _check_texts(texts)
        return await self._run([(text, None) for text in texts], "text", input_type, instruction)

    async def embed_images(
        self, images: list[Any], *, input_type: InputType = "document", instruction: str | None = None
    ) -> np.ndarray:
        """Embed images alone (path, bytes, base64 / data URI, PIL image; URLs only when allowed)."""
        _check_list("images", images)
        return await self._run([(None, image) for image in images], "image", input_type, instruction)

    async def embed_fused(
        self,
        texts: list[str],
        images: list[Any],
        *,
        input_type: InputType = "document",
        instruction: str | None = None,
    ) -> np.ndarray:
        """Embed pairs (texts[i], images[i]) as one input each: image placeholder first, then the text."""
        _check_list("images", images)
        _check_texts(texts)
        if len(texts) != len(images):
            raise InvalidRequestError(
                f"embed_fused needs one image per text: got {len(texts)} texts and {len(images)} images",
                texts=len(texts),
                images=len(images),
            )
        return await self._run(list(zip(texts, images, strict=True)), "fused", input_type, instruction)

    async def warmup(self) -> None:
        """Plan the token budget (measured on a GPU when "auto"; a full-budget forward of the worst-case input
        proves it), then, with MULTIMODAL_EMBEDDING_WARMUP, embed an image at MAX_PIXELS and a text end to end."""
        await self.batcher.start()
        self.budget = await plan_batch_tokens(
            self.batcher,
            self.spec,
            self.config,
            max_length=self.config.max_length,
            probe_forward=self._probe_forward,
            run_warmup=self.config.warmup,
        )
        if self.config.warmup:
            await self.embed_fused(["warm-up"], [largest_image(self.config.max_pixels)])
            await self.embed(["warm-up"])

    def info(self) -> ProviderInfo:
        return self.spec.provider_info(
            model=self.config.model_name,
            dimension=self._dim,
            memory_bytes=self.memory_bytes,
            extra={
                "max_length": self.config.max_length,
                "min_pixels": self.config.min_pixels,
                "max_pixels": self.config.max_pixels,
                "max_batch_tokens": self.batcher.max_batch_tokens,
                **({"budget_source": self.budget.source} if self.budget else {}),
            },
        )

    async def close(self) -> None:
        """Finish accepted work, stop the device thread and release the GPU memory. Idempotent."""
        await self.batcher.close()
        if self.spec.is_cuda:
            self.runner.model = self.model = None
            torch.cuda.empty_cache()

    # --- internals ------------------------------------------------------------------------------------------
    async def _run(
        self, inputs: list[tuple[str | None, Any]], group: str, input_type: InputType, instruction: str | None
    ) -> np.ndarray:
        if input_type not in ("query", "document"):
            raise InvalidRequestError(f"input_type={input_type!r}: expected 'query' or 'document'")
        if not inputs:
            return np.zeros((0, self._dim), dtype=np.float32)
        prompt_instruction = resolve_instruction(input_type, instruction, self.config.instruction)
        features = await asyncio.to_thread(self._prepare, inputs, prompt_instruction, group != "text")
        rows = await self.batcher.submit([WorkItem(f, f.cost, group) for f in features])
        return np.stack(rows).astype(np.float32, copy=False)

    def _prepare(
        self, inputs: list[tuple[str | None, Any]], instruction: str, with_images: bool
    ) -> list[GmeFeatures]:
        """Worker thread: load and validate images, resize as fetch_image, run the processor."""
        prepared = []
        for index, (text, source) in enumerate(inputs):
            image = fetch_image(self.images.load(source, index)) if with_images else None
            prepared.append(self.builder.build(text, image, instruction))
        return prepared

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions != self._dim:
            raise InvalidRequestError(
                f"dimensions={dimensions}: GME has no Matryoshka truncation; its width is {self._dim}",
                limit=self._dim,
                received=dimensions,
            )

    def _probe_forward(self, rows: int, tokens: int) -> None:
        """Device thread: one forward of `rows` worst-case inputs of `tokens` tokens (budget measurement)."""
        features = self._synthetic_input(tokens)
        embed_batch(self.model, self.builder.collate([features] * rows), self.spec.torch_device)

    def _synthetic_input(self, tokens: int) -> GmeFeatures:
        """The costliest input of `tokens` tokens: the largest image that fits (at most MAX_PIXELS), then text."""
        overhead = self.builder.encode("", None, DEFAULT_INSTRUCTION).cost + 2  # template + vision start/end
        image_tokens = min(self.config.max_pixels // 784, tokens - overhead - 1)
        image = None
        if image_tokens * 784 >= self.config.min_pixels:
            image = fetch_image(largest_image(image_tokens * 784))
        return self.builder.build("warm up " * tokens, image, DEFAULT_INSTRUCTION, max_length=tokens)

    def _check_geometry(self) -> None:
        """GME's vectors are the decoder's last-token state: no other width, no other pooling."""
        wanted = self.config.embedding_dim
        if wanted is not None and wanted != self._dim:
            raise ConfigurationError(
                f"{ENV}EMBEDDING_DIM={wanted}, but {self.config.model_source} gives {self._dim}-wide vectors "
                f"(GME has no Matryoshka truncation): set {ENV}EMBEDDING_DIM={self._dim} or leave it empty"
            )
        if self.config.pooling not in ("auto", "lasttoken"):
            raise ConfigurationError(
                f"{ENV}POOLING={self.config.pooling}: GME pools the last token; set auto or lasttoken"
            )

    def _check_max_length(self) -> None:
        """The largest image plus the template must fit MAX_LENGTH, or such images could never be embedded."""
        largest = self.builder.encode(None, fetch_image(largest_image(self.config.max_pixels)), DEFAULT_INSTRUCTION)
        if largest.cost > self.config.max_length:
            raise ConfigurationError(
                f"{ENV}MAX_LENGTH={self.config.max_length} is below the {largest.cost} tokens of an image at "
                f"{ENV}MAX_PIXELS={self.config.max_pixels} with its template; raise the max length or lower "
                "the max pixels"
            )


def largest_image(max_pixels: int) -> Image.Image:
    """A grey image of the most 28x28 tiles that fit `max_pixels` (aspect ratio within GME's limit)."""
    tiles = max_pixels // (28 * 28)
    best = max(
        ((rows, tiles // rows) for rows in range(1, math.isqrt(tiles) + 1) if (tiles // rows) / rows <= MAX_RATIO),
        key=lambda shape: (shape[0] * shape[1], shape[0]),  # most tiles, then the squarest
    )
    return Image.new("RGB", (best[1] * 28, best[0] * 28), (128, 128, 128))


def _check_list(name: str, values: Any) -> None:
    if not isinstance(values, (list, tuple)):
        raise InvalidInputTypeError(f"{name} must be a list, not {type(values).__name__}")


def _check_texts(texts: Sequence[Any]) -> None:
    _check_list("texts", texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputTypeError(f"texts[{i}] is {type(text).__name__}; expected a string", index=i)
