"""Settings groups of the services around the models: MILVUS_*, RAG_*, LLM_*, BACKEND_* (see backend.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from backend.config_sources import settings_config


class MilvusConfig(BaseSettings):
    """MILVUS_*: the vector store. Milvus Lite (a local path) by default, a server through an http URI."""

    model_config = settings_config("MILVUS_")

    # Local path = embedded Milvus Lite (one process per path); http://host:19530 = a Milvus server (>= 2.4).
    # Empty = `<BACKEND_DATA_DIR>/milvus.db`.
    uri: str | None = None
    token: SecretStr | None = None
    collection_name: str = "rag_chunks"
    # Index types that are real on both Lite and a server; COSINE is the only metric (vectors are normalised).
    index_type: Literal["HNSW", "AUTOINDEX", "FLAT", "IVF_FLAT"] = "HNSW"
    metric_type: Literal["COSINE"] = "COSINE"
    # Hybrid (text + image) fusion: rrf (rank-based, no tuning) or weighted (needs comparable scores).
    hybrid_fusion: Literal["rrf", "weighted"] = "rrf"
    hybrid_weights: str = "0.7,0.3"
    rrf_k: int = Field(default=60, ge=1)
    # Candidates fetched from the store before the reranker keeps RERANKER_TOP_N.
    search_limit: int = Field(default=20, ge=1, le=16384)
    # HNSW graph degree and build breadth (Milvus needs both on a server). Larger = better recall, slower build.
    hnsw_m: int = Field(default=16, ge=2, le=2048)
    hnsw_ef_construction: int = Field(default=200, ge=1)
    # HNSW search breadth (raised to the request's limit when smaller). Larger = better recall, slower search.
    search_ef: int = Field(default=64, ge=1)
    # IVF_FLAT cluster count at build and clusters probed per search. More probes = better recall, slower search.
    ivf_nlist: int = Field(default=128, ge=1, le=65536)
    ivf_nprobe: int = Field(default=16, ge=1, le=65536)
    # Consistency of searches. Strong = a query sees every finished ingest (read-your-writes); Bounded/Eventually
    # are faster on a server but may miss the last seconds of writes. Deletes and re-ingests always read Strong.
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong"
    # Seconds one store call may take before it fails with HTTP 503 (a stalled or unreachable server).
    request_timeout: float = Field(default=30.0, gt=0)

    @field_validator("hybrid_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        try:
            weights = [float(part) for part in value.split(",")]
        except ValueError as exc:
            raise ValueError("must be two comma-separated numbers, e.g. 0.7,0.3") from exc
        if len(weights) != 2 or any(w < 0 for w in weights):
            raise ValueError("must be two non-negative comma-separated numbers, e.g. 0.7,0.3")
        return value

    @property
    def weights(self) -> tuple[float, float]:
        first, second = (float(part) for part in self.hybrid_weights.split(","))
        return first, second


class RagConfig(BaseSettings):
    """RAG_*: chunking of ingested documents."""

    model_config = settings_config("RAG_")

    # Chunk size and overlap in characters. Larger chunks carry more context per hit but dilute the vector.
    chunk_size: int = Field(default=1000, ge=50)
    chunk_overlap: int = Field(default=150, ge=0)

    @model_validator(mode="after")
    def _overlap(self) -> RagConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap: RAG_CHUNK_OVERLAP ({self.chunk_overlap}) must be smaller than "
                f"RAG_CHUNK_SIZE ({self.chunk_size})"
            )
        return self


class LLMConfig(BaseSettings):
    """LLM_*: optional OpenAI-compatible chat model that writes an answer from the retrieved contexts."""

    model_config = settings_config("LLM_")

    # Empty = retrieval results only, no generated answer.
    base_url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    request_timeout: float = Field(default=60.0, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url and self.model)


class BackendConfig(BaseSettings):
    """BACKEND_*: the HTTP server."""

    model_config = settings_config("BACKEND_")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Optional bearer key for every /api and /v1 route (compared in constant time). Empty = no auth.
    api_key: SecretStr | None = None
    # Where local state lives (the Milvus Lite database by default).
    data_dir: Path = Path("data")
    # Request limits, enforced by the request schemas (HTTP 422 naming the limit and the value).
    max_items_per_request: int = Field(default=10_000, ge=1)
    max_chars_per_item: int = Field(default=200_000, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
