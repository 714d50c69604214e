"""The Milvus store, run unchanged against embedded Milvus Lite and a separate `milvus-lite server` over http."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backend.config import MilvusConfig
from backend.errors import ConfigurationError, StoreUnavailableError
from backend.services.vector_store import MilvusVectorStore, active_collection, chunk_id
from tests.milvus_server import free_port, milvus_lite_server

_names = itertools.count()


@pytest.fixture(scope="module", params=["embedded", "server"])
def milvus_uri(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One store per module and kind: a Milvus Lite folder, or a Lite server process on 127.0.0.1."""
    if request.param == "embedded":
        yield str(tmp_path_factory.mktemp("lite") / "milvus.db")
        return
    with milvus_lite_server(tmp_path_factory.mktemp("server") / "data") as uri:
        yield uri


def config(**values: object) -> MilvusConfig:
    values.setdefault("collection_name", f"t{next(_names)}")
    values.setdefault("index_type", "FLAT")
    return MilvusConfig(_env_file=None, **values)


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def row(doc_id: str, chunk_no: int, text_vec: np.ndarray, image_vec: np.ndarray | None = None, **extra: object):
    data = {"id": chunk_id(doc_id, chunk_no), "doc_id": doc_id, "chunk_no": chunk_no, "text": f"{doc_id} {chunk_no}",
            "metadata": {"source": f"{doc_id}.txt"}, "text_vec": text_vec, **extra}
    if image_vec is not None:
        data["image_vec"] = image_vec
    return data


@pytest.fixture
def store(milvus_uri: str) -> Iterator[MilvusVectorStore]:
    opened = MilvusVectorStore.open(milvus_uri, config(), text_dim=4, image_dim=None)
    yield opened
    opened.close()


def test_first_open_creates_a_versioned_collection_behind_the_alias(milvus_uri: str) -> None:
    settings = config()
    store = MilvusVectorStore.open(milvus_uri, settings, text_dim=4, image_dim=None)
    try:
        assert store.collection == f"{settings.collection_name}_v1"
        assert active_collection(store.client, settings.collection_name) == store.collection
        assert store.count() == 0
    finally:
        store.close()


def test_upsert_search_count_and_idempotent_overwrite(store: MilvusVectorStore) -> None:
    rows = [row("a", 0, unit(1, 0, 0, 0)), row("a", 1, unit(1, 1, 0, 0)), row("b", 0, unit(0, 0, 1, 0))]
    store.upsert(rows)
    store.flush()
    hits = store.search(unit(1, 0.1, 0, 0), limit=3)
    assert [hit.id for hit in hits] == ["a:0", "a:1", "b:0"]
    assert hits[0].score == pytest.approx(float(unit(1, 0.1, 0, 0)[0]), abs=1e-5)
    assert hits[0].metadata == {"source": "a.txt"} and hits[0].doc_id == "a" and hits[0].chunk_no == 0
    assert [h.id for h in store.search(unit(1, 0, 0, 0), limit=5, expr='doc_id == "b"')] == ["b:0"]
    store.upsert([row("a", 0, unit(0, 0, 0, 1), text="new text")])  # same key: overwritten, not doubled
    assert store.count() == 3
    assert store.get(["a:0"], ["text"])[0]["text"] == "new text"
    assert store.search(unit(0, 0, 0, 1), limit=1)[0].id == "a:0"


def test_delete_doc_from_a_chunk_number(store: MilvusVectorStore) -> None:
    store.upsert([row("d", n, unit(1, n, 0, 0)) for n in range(5)] + [row("e", 0, unit(0, 1, 0, 0))])
    assert store.delete_doc("d", from_chunk_no=3) == 2
    assert sorted(r["id"] for r in store.query('doc_id == "d"', ["id"])) == ["d:0", "d:1", "d:2"]
    assert store.delete_doc("d") == 3
    assert store.delete_doc("d") == 0
    assert store.count() == 1


def test_doc_ids_with_quotes_are_filtered_exactly(store: MilvusVectorStore) -> None:
    tricky = 'say "hi" \\ ok'
    store.upsert([row(tricky, 0, unit(1, 0, 0, 0)), row("say", 0, unit(1, 0, 0, 0))])
    assert store.delete_doc(tricky) == 1
    assert [r["id"] for r in store.query("", ["id"], limit=10)] == ["say:0"]


def test_reopen_loads_the_collection_and_keeps_rows(milvus_uri: str) -> None:
    settings = config()
    first = MilvusVectorStore.open(milvus_uri, settings, text_dim=4, image_dim=None)
    first.upsert([row("k", n, unit(1, n, 0, 0)) for n in range(3)])
    first.flush()
    first.close()
    again = MilvusVectorStore.open(milvus_uri, settings, text_dim=4, image_dim=None)
    try:
        assert again.count() == 3
        assert again.search(unit(1, 0, 0, 0), limit=1)[0].id == "k:0"
        assert sorted(r["id"] for batch in again.iterate(["id"], batch_size=2) for r in batch) == ["k:0", "k:1", "k:2"]
    finally:
        again.close()


def test_dimension_guard_refuses_to_start_and_names_both(milvus_uri: str) -> None:
    settings = config()
    MilvusVectorStore.open(milvus_uri, settings, text_dim=4, image_dim=None).close()
    with pytest.raises(ConfigurationError, match=r"4-d text vectors.*produces 8-d.*python scripts/reindex.py"):
        MilvusVectorStore.open(milvus_uri, settings, text_dim=8, image_dim=None, provider_name="the provider")
    with pytest.raises(ConfigurationError, match=r"no image vectors.*3-d image vectors.*scripts/reindex.py"):
        MilvusVectorStore.open(milvus_uri, settings, text_dim=4, image_dim=3)


def test_mismatched_or_non_finite_vectors_are_never_stored(store: MilvusVectorStore) -> None:
    with pytest.raises(ConfigurationError, match="5-d text_vec"):
        store.upsert([row("x", 0, np.ones(5, dtype=np.float32))])
    with pytest.raises(ConfigurationError, match="NaN"):
        store.upsert([row("x", 0, np.array([1, np.nan, 0, 0], dtype=np.float32))])
    with pytest.raises(ConfigurationError, match="has no 'image_vec'"):
        store.upsert([row("x", 0, unit(1, 0, 0, 0), image_vec=unit(1, 0, 0))])
    assert store.count() == 0


@pytest.fixture
def multimodal_store(milvus_uri: str) -> Iterator[MilvusVectorStore]:
    """Text ranking for query (1,0,0,0): B > A > C > T; image ranking for (1,0,0): B > C > A; T has no image."""
    opened = MilvusVectorStore.open(milvus_uri, config(rrf_k=60), text_dim=4, image_dim=3)
    opened.upsert([
        row("A", 0, unit(0.8, 0.6, 0, 0), unit(0.6, 0.8, 0), image_ref="a.png"),
        row("B", 0, unit(1, 0, 0, 0), unit(1, 0, 0), image_ref="b.png"),
        row("C", 0, unit(0.6, 0.8, 0, 0), unit(0.8, 0.6, 0), image_ref="c.png"),
        row("T", 0, unit(0.1, 0, 1, 0)),
    ] + [row("T", n, unit(1, 0.05 * n, 0, 0)) for n in range(1, 4)])
    opened.flush()
    yield opened
    opened.close()


def test_image_search_never_returns_text_only_chunks(multimodal_store: MilvusVectorStore) -> None:
    hits = multimodal_store.search(unit(1, 0, 0), field="image_vec", limit=10)
    assert [h.doc_id for h in hits] == ["B", "C", "A"]
    assert all(h.has_image and h.image_ref.endswith(".png") for h in hits)
    text_hits = multimodal_store.search(unit(1, 0, 0, 0), limit=10)
    assert {h.doc_id for h in text_hits} == {"A", "B", "C", "T"}
    assert not any(h.has_image for h in text_hits if h.doc_id == "T")


def _store_with(store: MilvusVectorStore, **changes: object) -> MilvusVectorStore:
    return MilvusVectorStore(store.client, store.collection, store.config.model_copy(update=changes), uri=store.uri,
                             text_dim=store.text_dim, image_dim=store.image_dim)


def test_hybrid_rrf_fuses_ranks(multimodal_store: MilvusVectorStore) -> None:
    for k in (60, 10):
        hits = _store_with(multimodal_store, hybrid_fusion="rrf", rrf_k=k).hybrid_search(
            unit(1, 0, 0, 0), unit(1, 0, 0), limit=3
        )
        assert hits[0].doc_id == "B"  # first in both lists
        assert hits[0].score == pytest.approx(2 / (k + 1), rel=1e-4)


@pytest.mark.parametrize(("weights", "order"), [("0.9,0.1", ["B", "A", "C"]), ("0.1,0.9", ["B", "C", "A"])])
def test_hybrid_weighted_follows_the_weights(multimodal_store: MilvusVectorStore, weights: str, order: list[str]):
    hits = _store_with(multimodal_store, hybrid_fusion="weighted", hybrid_weights=weights).hybrid_search(
        unit(1, 0, 0, 0), unit(1, 0, 0), limit=10
    )
    image_docs = [h.doc_id for h in hits if h.doc_id != "T"]
    assert image_docs == order
    w_text, w_image = (float(w) for w in weights.split(","))
    expected_a = w_text * (1 + 0.8) / 2 + w_image * (1 + 0.6) / 2  # COSINE normalised as (x + 1) / 2
    assert next(h.score for h in hits if h.doc_id == "A") == pytest.approx(expected_a, rel=1e-4)


@pytest.mark.parametrize("index_type", ["HNSW", "IVF_FLAT", "AUTOINDEX"])
def test_every_allowed_index_type_builds_and_searches(milvus_uri: str, index_type: str) -> None:
    store = MilvusVectorStore.open(milvus_uri, config(index_type=index_type, ivf_nlist=2), text_dim=4, image_dim=2)
    try:
        store.upsert([row("i", n, unit(1, n, 0, 0), unit(1, n) if n % 2 else None) for n in range(4)])
        store.flush()
        assert store.search(unit(1, 0, 0, 0), limit=1)[0].id == "i:0"
        assert {h.id for h in store.search(unit(1, 1), field="image_vec", limit=4)} == {"i:1", "i:3"}
    finally:
        store.close()


def test_unreachable_server_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailableError, match=r"Cannot open the Milvus store at http://127\.0\.0\.1"):
        MilvusVectorStore.open(f"http://127.0.0.1:{free_port()}", config(), text_dim=4, image_dim=None)


def test_a_lost_server_mid_operation_is_store_unavailable(tmp_path: Path) -> None:
    with milvus_lite_server(tmp_path / "data") as uri:
        store = MilvusVectorStore.open(uri, config(request_timeout=5), text_dim=4, image_dim=None)
    try:
        with pytest.raises(StoreUnavailableError, match="failed to search") as caught:
            store.search(unit(1, 0, 0, 0), limit=1)
        assert caught.value.status_code == 503
    finally:
        store.close()
