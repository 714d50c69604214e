"""Settings: parsing from the environment and env files, every validation error, secrets kept out of sight."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from backend import config as config_module
from backend.config import PACKAGED_MINILM, ProviderType, Settings
from backend.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
GROUPS: list[type[BaseSettings]] = [
    config_module.EmbeddingConfig,
    config_module.RerankerConfig,
    config_module.MultimodalEmbeddingConfig,
    config_module.MilvusConfig,
    config_module.RagConfig,
    config_module.LLMConfig,
    config_module.BackendConfig,
]


def variables_per_field() -> list[list[str]]:
    """For every setting, the environment variable(s) that set it (several for a field with aliases)."""
    fields = []
    for group in GROUPS:
        prefix = str(group.model_config.get("env_prefix", ""))
        for name, info in group.model_fields.items():
            aliases = getattr(info.validation_alias, "choices", None)
            fields.append([str(alias) for alias in aliases] if aliases else [f"{prefix}{name.upper()}"])
    return fields


def all_variables() -> list[str]:
    return [name for names in variables_per_field() for name in names]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the developer's shell."""
    for name in all_variables():
        monkeypatch.delenv(name, raising=False)


def load_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        Settings.load()
    return str(caught.value)


def test_defaults_serve_the_packaged_model_on_the_cpu() -> None:
    settings = Settings.load()
    assert settings.embedding.provider is ProviderType.LOCAL_GPU
    assert settings.embedding.model_path == PACKAGED_MINILM
    assert settings.embedding.device == "cpu"
    assert settings.embedding.resolved_dtype() == "float32"
    assert settings.reranker.enabled is False
    assert settings.multimodal.enabled is False


def test_environment_is_parsed_into_typed_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "EMBEDDING_MODEL_NAME": "Qwen/Qwen3-Embedding-4B",
        "EMBEDDING_EMBEDDING_DIM": "2560",
        "EMBEDDING_DEVICE": "CUDA:0",
        "EMBEDDING_MAX_BATCH_TOKENS": "16384",
        "RERANKER_ENABLED": "true",
        "RERANKER_BATCH_SIZE": "12",
        "MULTIMODAL_EMBEDDING_ENABLED": "1",
        "MULTIMODAL_EMBEDDING_DEVICE": "cuda:2",
        "BACKEND_PORT": "9000",
        "BACKEND_MAX_ITEMS_PER_REQUEST": "50",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load()
    assert settings.embedding.embedding_dim == 2560
    assert settings.embedding.device == "cuda:0"  # normalised
    assert settings.embedding.resolved_dtype() == "float16"
    assert settings.embedding.max_batch_tokens == 16384
    # Another model name and no path: that model is loaded, not the packaged default.
    assert settings.embedding.model_path is None
    assert settings.embedding.model_source == "Qwen/Qwen3-Embedding-4B"
    assert settings.reranker.enabled is True and settings.reranker.max_batch_size == 12
    assert settings.multimodal.enabled is True and settings.multimodal.device == "cuda:2"
    assert settings.backend.port == 9000 and settings.backend.max_items_per_request == 50


def test_env_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "backend.env"
    env_file.write_text(
        "# a comment\nEMBEDDING_PROVIDER=openai\nEMBEDDING_BASE_URL=http://127.0.0.1:9/v1\n"
        "EMBEDDING_API_KEY=sk-from-file\nRAG_CHUNK_SIZE=500\nBACKEND_PORT=8100\n"
    )
    monkeypatch.setenv("BACKEND_PORT", "8200")
    settings = Settings.load(env_file=env_file)
    assert settings.embedding.provider is ProviderType.OPENAI
    assert settings.embedding.base_url == "http://127.0.0.1:9/v1"
    assert settings.embedding.api_key is not None and settings.embedding.api_key.get_secret_value() == "sk-from-file"
    assert settings.rag.chunk_size == 500
    assert settings.backend.port == 8200
    # BACKEND_ENV_FILE selects the file when none is passed.
    monkeypatch.setenv("BACKEND_ENV_FILE", str(env_file))
    assert Settings.load().rag.chunk_size == 500


def test_overrides_by_field_name_are_validated_too() -> None:
    assert Settings.load(reranker={"max_batch_size": 3}).reranker.max_batch_size == 3
    with pytest.raises(ConfigurationError, match=r"RERANKER_BATCH_SIZE / RERANKER_MAX_BATCH_SIZE=-3"):
        Settings.load(reranker={"max_batch_size": -3})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EMBEDDING_PROVIDER": "huggingface"}, "EMBEDDING_PROVIDER='huggingface': Input should be 'openai', 'jina'"),
        ({"RERANKER_PROVIDER": "cohere"}, "RERANKER_PROVIDER='cohere'"),
        ({"EMBEDDING_DEVICE": "gpu0"}, "EMBEDDING_DEVICE='gpu0': must be 'cpu' or 'cuda:N'"),
        ({"MULTIMODAL_EMBEDDING_DEVICE": "cuda"}, "MULTIMODAL_EMBEDDING_DEVICE='cuda'"),
        ({"EMBEDDING_MAX_BATCH_SIZE": "-1"}, "EMBEDDING_MAX_BATCH_SIZE='-1': Input should be greater than or equal"),
        ({"EMBEDDING_MAX_BATCH_TOKENS": "-5"}, "EMBEDDING_MAX_BATCH_TOKENS='-5': must be 'auto' or a positive"),
        ({"EMBEDDING_MAX_QUEUE_TIME_MS": "-1"}, "EMBEDDING_MAX_QUEUE_TIME_MS='-1'"),
        ({"RERANKER_MAX_DOCUMENTS": "0"}, "RERANKER_MAX_DOCUMENTS='0'"),
        ({"BACKEND_MAX_ITEMS_PER_REQUEST": "-10"}, "BACKEND_MAX_ITEMS_PER_REQUEST='-10'"),
        ({"BACKEND_MAX_CHARS_PER_ITEM": "0"}, "BACKEND_MAX_CHARS_PER_ITEM='0'"),
        ({"EMBEDDING_EMBEDDING_DIM": "5"}, "EMBEDDING_EMBEDDING_DIM='5': Input should be greater than or equal to 32"),
        ({"MULTIMODAL_EMBEDDING_EMBEDDING_DIM": "20000"}, "MULTIMODAL_EMBEDDING_EMBEDDING_DIM='20000'"),
        ({"EMBEDDING_DTYPE": "int8"}, "EMBEDDING_DTYPE='int8'"),
        ({"EMBEDDING_ATTN_IMPLEMENTATION": "flash"}, "EMBEDDING_ATTN_IMPLEMENTATION='flash'"),
        ({"RERANKER_ENABLED": "maybe"}, "RERANKER_ENABLED='maybe'"),
        ({"BACKEND_PORT": "70000"}, "BACKEND_PORT='70000'"),
        ({"EMBEDDING_PROVIDER": "openai"}, "EMBEDDING_BASE_URL: EMBEDDING_BASE_URL is required"),
        ({"RAG_CHUNK_OVERLAP": "1000"}, "RAG_CHUNK_OVERLAP: RAG_CHUNK_OVERLAP (1000) must be smaller than RAG_CHUNK"),
        ({"MULTIMODAL_EMBEDDING_MIN_PIXELS": "2000000"}, "MULTIMODAL_EMBEDDING_MIN_PIXELS (2000000) must not exceed"),
        ({"MILVUS_HYBRID_WEIGHTS": "a,b"}, "MILVUS_HYBRID_WEIGHTS='a,b'"),
    ],
)
def test_invalid_values_name_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    assert expected in load_error(monkeypatch, **env)


def test_all_problems_are_reported_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, EMBEDDING_DEVICE="tpu", RERANKER_MAX_DOCUMENTS="-1", BACKEND_PORT="x")
    assert message.startswith("Invalid settings:")
    assert "EMBEDDING_DEVICE='tpu'" in message
    assert "RERANKER_MAX_DOCUMENTS='-1'" in message
    assert "BACKEND_PORT='x'" in message


def test_secrets_stay_out_of_repr_errors_and_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    secret = "sk-very-secret-value"
    monkeypatch.setenv("EMBEDDING_PROVIDER", "openai")
    monkeypatch.setenv("EMBEDDING_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("EMBEDDING_API_KEY", secret)
    monkeypatch.setenv("BACKEND_API_KEY", secret)
    monkeypatch.setenv("MILVUS_TOKEN", secret)
    settings = Settings.load()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s %s %s", settings.embedding, settings.backend, settings.milvus)
    for text in (repr(settings.embedding), str(settings.backend), repr(settings.milvus), caplog.text):
        assert secret not in text
    assert settings.embedding.api_key.get_secret_value() == secret
    # An invalid setting next to a secret: the error names the problem, never the secret.
    monkeypatch.setenv("EMBEDDING_MAX_RETRIES", "99")
    message = load_error(monkeypatch)
    assert "EMBEDDING_MAX_RETRIES='99'" in message and secret not in message
    monkeypatch.delenv("EMBEDDING_BASE_URL")  # a model-level error has the whole group as its input
    assert secret not in load_error(monkeypatch)


def test_env_example_documents_every_variable() -> None:
    example = (ROOT / "env.backend.example").read_text()
    documented = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", example))
    missing = [names for names in variables_per_field() if not documented.intersection(names)]
    assert not missing, f"env.backend.example lacks {missing}"


def test_env_example_is_the_three_gpu_layout() -> None:
    settings = Settings.load(env_file=ROOT / "env.backend.example")
    assert (settings.embedding.model_name, settings.embedding.embedding_dim, settings.embedding.device) == (
        "Qwen/Qwen3-Embedding-4B", 2560, "cuda:0")
    assert (settings.reranker.enabled, settings.reranker.model_name, settings.reranker.device) == (
        True, "Qwen/Qwen3-Reranker-4B", "cuda:1")
    assert (settings.multimodal.model_name, settings.multimodal.embedding_dim, settings.multimodal.device) == (
        "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", 1536, "cuda:2")
    for group in (settings.embedding, settings.reranker, settings.multimodal):
        assert (group.dtype, group.attn_implementation) == ("float16", "sdpa")


@pytest.mark.parametrize("name", ["3x1080ti.env", "single-gpu.env", "cpu.env", "online.env"])
def test_example_layouts_are_valid(name: str) -> None:
    settings = Settings.load(env_file=ROOT / "configs" / name)
    assert settings.embedding.model_name
    if name == "online.env":
        assert settings.embedding.provider is ProviderType.OPENAI and settings.reranker.provider is ProviderType.JINA
    if name == "cpu.env":
        assert settings.embedding.device == "cpu" and settings.embedding.model_path == PACKAGED_MINILM
