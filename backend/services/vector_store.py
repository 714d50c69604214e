"""The RAG vector store: one Milvus collection of chunks, through pymilvus' MilvusClient.

One code path for both deployments: MILVUS_URI as a local path opens embedded Milvus Lite (one process per path),
`http://host:19530` a Milvus server (>= 2.4, needed for two vector fields and hybrid search).

Layout. MILVUS_COLLECTION_NAME is a *logical* name: an alias that points at a physical collection
`<name>_v<N>`. `scripts/reindex.py` fills `<name>_v<N+1>` and then moves the alias, so the switch is atomic and
the old collection stays until the user drops it. Rows: VARCHAR primary key `{doc_id}:{chunk_no}`, doc_id,
chunk_no, text, metadata (JSON), `text_vec`; with multimodal enabled also `image_vec`, `has_image` and
`image_ref`. Text-only rows carry a fixed unit placeholder in `image_vec` (portable: Lite stores nullable vectors
as zeros, older servers have no nullable vectors) and image searches are always filtered on `has_image == true`.

Every pymilvus or connection failure becomes `StoreUnavailableError` (HTTP 503) naming the operation and cause.
Calls are synchronous; async callers run them in a worker thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException

from backend.config import MilvusConfig
from backend.errors import BackendError, ConfigurationError, StoreUnavailableError

logger = logging.getLogger(__name__)

TEXT_FIELD = "text_vec"
IMAGE_FIELD = "image_vec"
MAX_ID_LENGTH = 512
MAX_DOC_ID_LENGTH = 256
MAX_TEXT_LENGTH = 65535  # Milvus' VARCHAR limit in bytes
MAX_REF_LENGTH = 2048
REINDEX_HINT = "python scripts/reindex.py"
_BASE_FIELDS = ["doc_id", "chunk_no", "text", "metadata"]
_IMAGE_FIELDS = ["has_image", "image_ref"]
_VERSION = re.compile(r"_v(\d+)$")


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: its primary key, stored fields and the store's score (COSINE, or fused)."""

    id: str
    doc_id: str
    chunk_no: int
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    has_image: bool = False
    image_ref: str = ""


def chunk_id(doc_id: str, chunk_no: int) -> str:
    """The deterministic primary key of a chunk: re-ingesting a document overwrites its rows in place."""
    return f"{doc_id}:{chunk_no}"


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def connect(uri: str, token: str | None = None, *, timeout: float = 30.0) -> MilvusClient:
    """Open a client: a local path is Milvus Lite (its parent folder is created), http(s):// a server."""
    local = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
    if local:
        Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=timeout)
    except MilvusException as exc:
        hint = (" Only one process may open a Milvus Lite folder: stop the other one, or run "
                "`milvus-lite server --host 127.0.0.1 --data-dir <dir>` and set MILVUS_URI=http://127.0.0.1:<port>."
                if local else "")
        raise StoreUnavailableError(f"Cannot open the Milvus store at {uri}: {exc}.{hint}", uri=uri) from exc


def active_collection(client: MilvusClient, logical: str) -> str | None:
    """The physical collection the logical name points at (alias, or a plain collection), None when absent."""
    if logical in client.list_collections():
        return logical
    if logical not in client.list_aliases().get("aliases", []):  # describe_alias would log a traceback
        return None
    return str(client.describe_alias(logical)["collection_name"])


def versioned_collections(client: MilvusClient, logical: str) -> dict[int, str]:
    """Physical collections `<logical>_v<N>`, keyed by N."""
    found = {}
    for name in client.list_collections():
        match = _VERSION.search(name)
        if match and name[: match.start()] == logical:
            found[int(match.group(1))] = name
    return found


def collection_dims(client: MilvusClient, name: str) -> tuple[int, int | None]:
    """(text_vec dim, image_vec dim or None) of a stored collection."""
    dims: dict[str, int] = {}
    for spec in client.describe_collection(name)["fields"]:
        if spec["name"] in (TEXT_FIELD, IMAGE_FIELD):
            dims[spec["name"]] = int(spec["params"]["dim"])
    if TEXT_FIELD not in dims:
        raise ConfigurationError(f"Collection '{name}' has no '{TEXT_FIELD}' field: it was not made by this backend")
    return dims[TEXT_FIELD], dims.get(IMAGE_FIELD)


def create_collection(
    client: MilvusClient, name: str, config: MilvusConfig, *, text_dim: int, image_dim: int | None
) -> None:
    """Create (and load) a chunk collection with COSINE indexes of MILVUS_INDEX_TYPE on each vector field."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID_LENGTH)
    schema.add_field("chunk_no", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_LENGTH)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field(TEXT_FIELD, DataType.FLOAT_VECTOR, dim=text_dim)
    if image_dim is not None:
        schema.add_field(IMAGE_FIELD, DataType.FLOAT_VECTOR, dim=image_dim)
        schema.add_field("has_image", DataType.BOOL)
        schema.add_field("image_ref", DataType.VARCHAR, max_length=MAX_REF_LENGTH)
    index = client.prepare_index_params()
    build = {"HNSW": {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction},
             "IVF_FLAT": {"nlist": config.ivf_nlist}}.get(config.index_type, {})
    for vector_field in [TEXT_FIELD] + ([IMAGE_FIELD] if image_dim is not None else []):
        index.add_index(field_name=vector_field, index_type=config.index_type, metric_type=config.metric_type,
                        params=build)
    index.add_index(field_name="doc_id", index_type="INVERTED")
    client.create_collection(name, schema=schema, consistency_level="Strong")
    # sync=False: don't poll the build state (pymilvus sleeps 0.5 s per index); the server builds in the background
    # and load_collection waits for what it needs.
    client.create_index(name, index, sync=False)
    client.load_collection(name)
    logger.info("created collection %s (text %d-d, image %s, %s/%s)", name, text_dim, image_dim,
                config.index_type, config.metric_type)


class MilvusVectorStore:
    """Chunks of one physical collection. Build with `open()` (the backend) or directly (the re-index job)."""

    def __init__(self, client: MilvusClient, collection: str, config: MilvusConfig, *, uri: str,
                 text_dim: int, image_dim: int | None) -> None:
        self.client = client
        self.collection = collection
        self.config = config
        self.uri = uri
        self.text_dim = text_dim
        self.image_dim = image_dim
        self._placeholder = None if image_dim is None else np.eye(1, image_dim, dtype=np.float32)[0].tolist()

    @classmethod
    def open(cls, uri: str, config: MilvusConfig, *, text_dim: int, image_dim: int | None,
             provider_name: str = "the embedding provider") -> MilvusVectorStore:
        """Connect, create `<name>_v1` + alias on first use, refuse a dimension mismatch, load the collection.

        Raises ConfigurationError when the stored dimensions differ from the providers' (names both and the
        re-index command), StoreUnavailableError when Milvus cannot be reached.
        """
        token = config.token.get_secret_value() if config.token else None
        client = connect(uri, token, timeout=config.request_timeout)
        try:
            store = cls._attach(client, uri, config, text_dim, image_dim, provider_name)
        except BaseException:
            client.close()
            raise
        return store

    @classmethod
    def _attach(cls, client: MilvusClient, uri: str, config: MilvusConfig, text_dim: int, image_dim: int | None,
                provider_name: str) -> MilvusVectorStore:
        logical = config.collection_name
        with _errors(uri, "open the collection"):
            physical = active_collection(client, logical)
            if physical is None:
                physical = f"{logical}_v1"
                if physical not in client.list_collections():
                    create_collection(client, physical, config, text_dim=text_dim, image_dim=image_dim)
                client.create_alias(physical, logical)
            stored_text, stored_image = collection_dims(client, physical)
        if stored_text != text_dim:
            raise ConfigurationError(
                f"The stored collection '{logical}' ({physical}) holds {stored_text}-d text vectors but "
                f"{provider_name} produces {text_dim}-d vectors. Refusing to start: mixing them would corrupt "
                f"retrieval. Run `{REINDEX_HINT}` to re-embed every chunk with the configured provider into a new "
                f"collection, or point EMBEDDING_* back at the model that built it.",
                stored_dim=stored_text, provider_dim=text_dim,
            )
        if stored_image != image_dim:
            have = "no image vectors" if stored_image is None else f"{stored_image}-d image vectors"
            want = "no image vectors (multimodal disabled)" if image_dim is None else f"{image_dim}-d image vectors"
            raise ConfigurationError(
                f"The stored collection '{logical}' ({physical}) has {have} but the configuration needs {want}. "
                f"Run `{REINDEX_HINT}` to rebuild it for the current MULTIMODAL_EMBEDDING_* settings.",
                stored_dim=stored_image, provider_dim=image_dim,
            )
        with _errors(uri, "load the collection"):
            client.load_collection(physical)  # Lite restarts in state 'released'; harmless on a server
        return cls(client, physical, config, uri=uri, text_dim=text_dim, image_dim=image_dim)

    @property
    def multimodal(self) -> bool:
        return self.image_dim is not None

    @property
    def output_fields(self) -> list[str]:
        return _BASE_FIELDS + (_IMAGE_FIELDS if self.multimodal else [])

    # --- writes -------------------------------------------------------------------------------------------
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or overwrite rows (by primary key). Each row: id, doc_id, chunk_no, text, metadata, text_vec,
        and optionally image_vec + image_ref. Vectors of the wrong width are refused, never stored."""
        if not rows:
            return
        prepared = [self._prepare(row) for row in rows]
        with _errors(self.uri, f"upsert {len(prepared)} chunks into '{self.collection}'"):
            self.client.upsert(self.collection, prepared)

    def _prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {key: row[key] for key in ("id", "doc_id", "chunk_no", "text", "metadata")}
        out[TEXT_FIELD] = self._vector(row[TEXT_FIELD], self.text_dim, TEXT_FIELD)
        image = row.get(IMAGE_FIELD)
        if self.multimodal:
            out["has_image"] = image is not None
            out[IMAGE_FIELD] = self._placeholder if image is None else self._vector(image, self.image_dim, IMAGE_FIELD)
            out["image_ref"] = str(row.get("image_ref") or "")
        elif image is not None:
            raise ConfigurationError(
                f"Chunk {row['id']} has an image but collection '{self.collection}' has no '{IMAGE_FIELD}': "
                "enable MULTIMODAL_EMBEDDING_ENABLED and re-index"
            )
        return out

    @staticmethod
    def _vector(vector: Any, dim: int | None, name: str) -> list[float]:
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.shape[0] != dim:
            raise ConfigurationError(f"Refusing to store a {array.shape[0]}-d {name}: the collection holds {dim}-d")
        if not np.isfinite(array).all():
            raise ConfigurationError(f"Refusing to store a {name} with NaN or Inf values")
        return array.tolist()

    def flush(self) -> None:
        """Seal written rows into segments (Lite brute-forces unflushed rows in Python)."""
        with _errors(self.uri, f"flush '{self.collection}'"):
            self.client.flush(self.collection)

    def delete_doc(self, doc_id: str, *, from_chunk_no: int = 0) -> int:
        """Delete the document's chunks with chunk_no >= from_chunk_no; returns how many there were."""
        expr = f"doc_id == {quote(doc_id)} and chunk_no >= {int(from_chunk_no)}"
        found = self.count(expr)
        if found:
            # By filter, with our own quoting (pymilvus' delete(ids=...) does not escape backslashes); the return
            # shape differs between Lite and server, so the count comes from the query above.
            with _errors(self.uri, f"delete chunks of '{doc_id}'"):
                self.client.delete(self.collection, filter=expr)
        return found

    # --- reads --------------------------------------------------------------------------------------------
    def query(self, expr: str, fields: list[str], *, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows matching a filter expression (Strong consistency: sees every finished write)."""
        kwargs: dict[str, Any] = {"limit": limit} if limit is not None else {}
        with _errors(self.uri, f"query '{self.collection}'"):
            return list(self.client.query(self.collection, filter=expr, output_fields=fields,
                                          consistency_level="Strong", **kwargs))

    def get(self, ids: list[str], fields: list[str]) -> list[dict[str, Any]]:
        """Rows by primary key; missing keys are simply absent."""
        if not ids:
            return []
        return self.query(f"id in [{', '.join(quote(i) for i in ids)}]", fields)  # quoted as delete_doc does

    def count(self, expr: str = "") -> int:
        """Number of rows (matching `expr`)."""
        with _errors(self.uri, f"count '{self.collection}'"):
            rows = self.client.query(self.collection, filter=expr, output_fields=["count(*)"],
                                     consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def iterate(self, fields: list[str], *, batch_size: int = 256) -> Iterator[list[dict[str, Any]]]:
        """Every row, in batches (for the re-index job)."""
        with _errors(self.uri, f"iterate '{self.collection}'"):
            iterator = self.client.query_iterator(self.collection, batch_size=batch_size, output_fields=fields)
        try:
            while True:
                with _errors(self.uri, f"iterate '{self.collection}'"):
                    batch = iterator.next()
                if not batch:
                    return
                yield list(batch)
        finally:
            iterator.close()

    def search(self, vector: np.ndarray, *, field: Literal["text_vec", "image_vec"] = TEXT_FIELD, limit: int,
               expr: str = "") -> list[Hit]:
        """Nearest chunks to one query vector on one vector field. Image searches only see rows with an image."""
        if field == IMAGE_FIELD:
            expr = _and(expr, "has_image == true")
        with _errors(self.uri, f"search '{self.collection}'"):
            result = self.client.search(
                self.collection, data=[self._vector(vector, self._dim(field), field)], anns_field=field,
                filter=expr, limit=limit, output_fields=self.output_fields,
                search_params={"metric_type": self.config.metric_type, "params": self._search_params(limit)},
                consistency_level=self.config.consistency_level,
            )
        return [self._hit(raw) for raw in result[0]]

    def hybrid_search(self, text_vector: np.ndarray, image_vector: np.ndarray, *, limit: int,
                      expr: str = "") -> list[Hit]:
        """One request per vector field (the image one filtered on has_image), fused by MILVUS_HYBRID_FUSION."""
        if not self.multimodal:
            raise ConfigurationError("Hybrid search needs image vectors: set MULTIMODAL_EMBEDDING_ENABLED=true")
        param = {"metric_type": self.config.metric_type, "params": self._search_params(limit)}
        requests = [
            AnnSearchRequest(data=[self._vector(text_vector, self.text_dim, TEXT_FIELD)], anns_field=TEXT_FIELD,
                             param=param, limit=limit, expr=expr or None),
            AnnSearchRequest(data=[self._vector(image_vector, self.image_dim, IMAGE_FIELD)], anns_field=IMAGE_FIELD,
                             param=param, limit=limit, expr=_and(expr, "has_image == true")),
        ]
        if self.config.hybrid_fusion == "weighted":
            ranker: Any = WeightedRanker(*self.config.weights, norm_score=True)
        else:
            ranker = RRFRanker(self.config.rrf_k)
        with _errors(self.uri, f"hybrid search '{self.collection}'"):
            result = self.client.hybrid_search(self.collection, reqs=requests, ranker=ranker, limit=limit,
                                               output_fields=self.output_fields,
                                               consistency_level=self.config.consistency_level)
        return [self._hit(raw) for raw in result[0]]

    def _dim(self, field: str) -> int | None:
        return self.text_dim if field == TEXT_FIELD else self.image_dim

    def _search_params(self, limit: int) -> dict[str, Any]:
        if self.config.index_type == "HNSW":
            return {"ef": max(self.config.search_ef, limit)}
        if self.config.index_type == "IVF_FLAT":
            return {"nprobe": min(self.config.ivf_nprobe, self.config.ivf_nlist)}
        return {}

    @staticmethod
    def _hit(raw: dict[str, Any]) -> Hit:
        entity = raw.get("entity", {})
        return Hit(
            id=str(raw["id"]), doc_id=entity["doc_id"], chunk_no=int(entity["chunk_no"]), text=entity["text"],
            score=float(raw["distance"]), metadata=entity.get("metadata") or {},
            has_image=bool(entity.get("has_image", False)), image_ref=entity.get("image_ref") or "",
        )

    def close(self) -> None:
        """Close the client (Lite releases its data-folder lock when the last client of the process closes)."""
        try:
            self.client.close()
        except MilvusException as exc:  # closing must not mask the caller's shutdown
            logger.warning("closing the Milvus client failed: %s", exc)


def _and(first: str, second: str) -> str:
    return f"({first}) and {second}" if first else second


@contextmanager
def _errors(uri: str, operation: str) -> Iterator[None]:
    """Turn pymilvus / connection failures into StoreUnavailableError naming the operation and the cause."""
    try:
        yield
    except BackendError:
        raise
    except (MilvusException, ConnectionError, OSError, TimeoutError) as exc:
        raise StoreUnavailableError(f"Milvus ({uri}) failed to {operation}: {exc}", uri=uri,
                                    operation=operation) from exc
    except Exception as exc:  # grpc.RpcError and friends from the transport
        if type(exc).__module__.startswith(("grpc", "pymilvus")):
            raise StoreUnavailableError(f"Milvus ({uri}) failed to {operation}: {exc}", uri=uri,
                                        operation=operation) from exc
        raise
