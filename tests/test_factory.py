"""ModelFactory: the registry table, clear errors for unknown combinations, disabled slots, EmbeddingFunc."""

from __future__ import annotations

import numpy as np
import pytest

from backend.config import ModelType, ProviderType
from backend.errors import ConfigurationError
from backend.providers.base import BaseEmbeddingProvider, BaseRerankerProvider
from backend.providers.jina import JinaEmbeddingProvider, JinaRerankerProvider
from backend.providers.openai_compat import OpenAICompatibleEmbeddingProvider
from backend.services import model_factory
from backend.services.model_factory import PROVIDER_REGISTRY, EmbeddingFunc
from tests.fakes import FakeEmbeddingProvider, make_settings

ONLINE = {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}


def test_registry_has_one_entry_per_served_combination() -> None:
    assert set(PROVIDER_REGISTRY) == {
        (ModelType.EMBEDDING, ProviderType.OPENAI),
        (ModelType.EMBEDDING, ProviderType.JINA),
        (ModelType.EMBEDDING, ProviderType.LOCAL_GPU),
        (ModelType.RERANKER, ProviderType.JINA),
        (ModelType.RERANKER, ProviderType.LOCAL_GPU),
        (ModelType.MULTIMODAL_EMBEDDING, ProviderType.LOCAL_GPU),
    }
    for target in PROVIDER_REGISTRY.values():
        module, _, name = target.partition(":")
        assert module.startswith("backend.providers.") and name, target


@pytest.mark.parametrize(
    ("model_type", "provider", "cls"),
    [
        (ModelType.EMBEDDING, ProviderType.OPENAI, OpenAICompatibleEmbeddingProvider),
        (ModelType.EMBEDDING, ProviderType.JINA, JinaEmbeddingProvider),
        (ModelType.RERANKER, ProviderType.JINA, JinaRerankerProvider),
    ],
)
def test_online_entries_resolve_to_their_classes(model_type: ModelType, provider: ProviderType, cls: type) -> None:
    assert model_factory.provider_class(model_type, provider) is cls


async def test_factory_builds_online_providers_from_settings() -> None:
    settings = make_settings(
        embedding={"provider": "openai", "embedding_dim": 64, **ONLINE},
        reranker={"enabled": True, "provider": "jina", **ONLINE},
    )
    embedder = model_factory.create_embedding_provider(settings.embedding)
    reranker = model_factory.create_reranker(settings.reranker)
    try:
        assert isinstance(embedder, OpenAICompatibleEmbeddingProvider) and embedder.embedding_dim == 64
        assert isinstance(reranker, JinaRerankerProvider) and isinstance(reranker, BaseRerankerProvider)
    finally:
        await embedder.close()
        await reranker.close()


@pytest.mark.parametrize(
    ("group", "creator", "message"),
    [
        (
            "reranker",
            model_factory.create_reranker,
            "No reranker provider 'openai': choose one of ['jina', 'local_gpu']",
        ),
        (
            "multimodal",
            model_factory.create_multimodal_provider,
            "No multimodal_embedding provider 'jina': choose one of ['local_gpu']",
        ),
    ],
)
def test_unknown_combination_names_the_choices(group: str, creator, message: str) -> None:
    provider = "openai" if group == "reranker" else "jina"
    settings = make_settings(**{group: {"enabled": True, "provider": provider, **ONLINE}})
    with pytest.raises(ConfigurationError) as caught:
        creator(getattr(settings, group))
    assert str(caught.value) == message


def test_unavailable_module_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        PROVIDER_REGISTRY, (ModelType.EMBEDDING, ProviderType.OPENAI), "backend.providers.no_such_module:Missing"
    )
    with pytest.raises(ConfigurationError, match=r"The embedding provider 'openai' is unavailable: .*no_such_module"):
        model_factory.provider_class(ModelType.EMBEDDING, ProviderType.OPENAI)


def test_disabled_slots_give_none_without_importing_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a disabled slot must not be built")

    monkeypatch.setattr(model_factory, "provider_class", refuse)
    settings = make_settings()
    assert model_factory.create_reranker(settings.reranker) is None
    assert model_factory.create_multimodal_provider(settings.multimodal) is None


def test_online_configuration_errors_surface_at_construction() -> None:
    no_key = make_settings(reranker={"enabled": True, "provider": "jina"})
    with pytest.raises(ConfigurationError, match="RERANKER_API_KEY is required for the 'jina' provider"):
        model_factory.create_reranker(no_key.reranker)


async def test_embedding_func_is_lightrag_compatible() -> None:
    provider = FakeEmbeddingProvider(dim=12)
    func = model_factory.create_embedding_func(provider)
    assert isinstance(func, EmbeddingFunc)
    assert (func.embedding_dim, func.max_token_size) == (12, 512)
    vectors = await func(["alpha", "beta"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 12)
    # Documents are embedded raw, exactly as the provider would.
    assert provider.calls[-1]["input_type"] == "document"
    np.testing.assert_array_equal(vectors, await provider.embed(["alpha", "beta"]))
    assert isinstance(provider, BaseEmbeddingProvider)
