"""RAGService: ingest documents into the vector store and answer questions from it.

- `ingest(documents)`: text documents are chunked (RAG_CHUNK_SIZE / RAG_CHUNK_OVERLAP) and embedded with the text
  provider; image documents become one chunk whose `text_vec` embeds the caption (or the image reference when
  there is none) and whose `image_vec` comes from the multimodal provider. Re-ingesting a doc_id replaces its
  chunks: the new chunks are upserted by their deterministic keys `{doc_id}:{chunk_no}`, then the document's
  chunks numbered beyond the new count are deleted, so a crash between the steps and a retry leave one copy.
- `delete(doc_id)`: removes a document's chunks (NotFoundError when there are none).
- `aquery(question, top_k, mode)`: embeds the question as a query, searches `text_vec` (text), `image_vec` (image)
  or both fused by RRF / weighted (hybrid), reranks text and hybrid candidates with the configured reranker, and
  returns the ranked contexts with scores and sources; with an LLM configured also an answer citing them.

Store calls are synchronous pymilvus calls; they run in worker threads so the event loop never blocks. Writes are
serialised by one lock (Milvus Lite supports a single writer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from backend.config import Settings
from backend.errors import InvalidRequestError, NotFoundError, ProviderDisabledError
from backend.providers.base import BaseEmbeddingProvider, BaseMultimodalEmbeddingProvider, BaseRerankerProvider
from backend.services.chunking import chunk_text
from backend.services.llm import ChatLLM
from backend.services.vector_store import (
    IMAGE_FIELD,
    MAX_DOC_ID_LENGTH,
    MAX_REF_LENGTH,
    MAX_TEXT_LENGTH,
    TEXT_FIELD,
    Hit,
    MilvusVectorStore,
    chunk_id,
)

logger = logging.getLogger(__name__)

Mode = Literal["text", "image", "hybrid"]
MODES: tuple[str, ...] = ("text", "image", "hybrid")


@dataclass
class Document:
    """What `ingest` takes. `text` for a text document; `image` (a file path, bytes, base64 / data URI or PIL
    image: whatever the multimodal provider accepts) with an optional caption in `text` for an image document.
    `image_ref` is what the store keeps to point back at the image (default: the path, else the doc_id)."""

    doc_id: str
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    image: Any = None
    image_ref: str | None = None


@dataclass
class Context:
    """One ranked result. `score` is the reranker's when one ran, else the store's (`retrieval_score`)."""

    id: str
    doc_id: str
    chunk_no: int
    text: str
    score: float
    retrieval_score: float
    metadata: dict[str, Any]
    image_ref: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QueryResult:
    question: str
    mode: str
    contexts: list[Context]
    answer: str | None = None
    reranked: bool = False


def embedding_text(text: str, image_ref: str) -> str:
    """What `text_vec` embeds for a chunk: its text, or for an image without caption its reference."""
    return text if text.strip() else image_ref


def default_image_ref(doc: Document) -> str:
    """A file path or URL given as the image points back at it; anything else (bytes, base64) is named by doc_id."""
    image = doc.image
    if isinstance(image, str) and len(image) <= MAX_REF_LENGTH:
        if image.startswith(("http://", "https://", "file://")) or os.path.isfile(image):
            return image
    return doc.doc_id


class RAGService:
    """Retrieval-augmented generation over one Milvus collection. Build it with `create()`."""

    def __init__(self, settings: Settings, store: MilvusVectorStore, embedding: BaseEmbeddingProvider, *,
                 reranker: BaseRerankerProvider | None = None,
                 multimodal: BaseMultimodalEmbeddingProvider | None = None, llm: ChatLLM | None = None) -> None:
        self.settings = settings
        self.store = store
        self.embedding = embedding
        self.reranker = reranker
        self.multimodal = multimodal
        self.llm = llm
        self._write_lock = asyncio.Lock()

    @classmethod
    async def create(cls, settings: Settings, embedding: BaseEmbeddingProvider, *,
                     reranker: BaseRerankerProvider | None = None,
                     multimodal: BaseMultimodalEmbeddingProvider | None = None) -> RAGService:
        """Open (or create) the collection at MILVUS_URI; refuse to start on a dimension mismatch."""
        info = embedding.info()
        store = await asyncio.to_thread(
            MilvusVectorStore.open, settings.milvus_uri, settings.milvus, text_dim=embedding.embedding_dim,
            image_dim=multimodal.embedding_dim if multimodal is not None else None,
            provider_name=f"the configured embedding provider ({info.provider}, {info.model})",
        )
        llm = ChatLLM(settings.llm) if settings.llm.enabled else None
        logger.info("RAG store ready: %s collection %s (%s)", settings.milvus_uri, store.collection,
                    "with LLM answers" if llm else "retrieval only")
        return cls(settings, store, embedding, reranker=reranker, multimodal=multimodal, llm=llm)

    # --- ingest / delete ----------------------------------------------------------------------------------
    async def ingest(self, documents: list[Document]) -> list[dict[str, Any]]:
        """Store the documents' chunks, replacing earlier versions of the same doc_ids.

        Returns [{"doc_id", "chunks", "removed"}] in input order ("removed": stale chunks of a shorter new
        version). Raises InvalidRequestError for bad documents (nothing is written then).
        """
        rows_per_doc = [self._chunk_rows(doc) for doc in self._validated(documents)]
        rows = [row for doc_rows in rows_per_doc for row in doc_rows]
        await self._embed_rows(rows, documents)
        async with self._write_lock:
            await asyncio.to_thread(self.store.upsert, rows)
            removed = []
            for doc, doc_rows in zip(documents, rows_per_doc, strict=True):
                removed.append(await asyncio.to_thread(self.store.delete_doc, doc.doc_id, from_chunk_no=len(doc_rows)))
            await asyncio.to_thread(self.store.flush)
        return [{"doc_id": doc.doc_id, "chunks": len(doc_rows), "removed": gone}
                for doc, doc_rows, gone in zip(documents, rows_per_doc, removed, strict=True)]

    async def delete(self, doc_id: str) -> int:
        """Delete every chunk of `doc_id`; returns how many. NotFoundError when the store holds none."""
        async with self._write_lock:
            deleted = await asyncio.to_thread(self.store.delete_doc, doc_id)
        if deleted == 0:
            raise NotFoundError(f"No document with doc_id '{doc_id}' is stored", doc_id=doc_id)
        return deleted

    def _validated(self, documents: list[Document]) -> list[Document]:
        if not documents:
            raise InvalidRequestError("No documents given: send at least one")
        seen: set[str] = set()
        for doc in documents:
            if not doc.doc_id or len(doc.doc_id.encode()) > MAX_DOC_ID_LENGTH:
                raise InvalidRequestError(
                    f"doc_id must be 1..{MAX_DOC_ID_LENGTH} bytes; got {len(doc.doc_id.encode())}: {doc.doc_id[:80]!r}"
                )
            if doc.doc_id in seen:
                raise InvalidRequestError(f"doc_id '{doc.doc_id}' appears twice in one ingest request")
            seen.add(doc.doc_id)
            if doc.image is None and not doc.text.strip():
                raise InvalidRequestError(f"Document '{doc.doc_id}' has neither text nor an image")
            if doc.image is not None and self.multimodal is None:
                raise ProviderDisabledError(
                    f"Document '{doc.doc_id}' is an image but multimodal embedding is disabled: "
                    "set MULTIMODAL_EMBEDDING_ENABLED=true"
                )
        return documents

    def _chunk_rows(self, doc: Document) -> list[dict[str, Any]]:
        if doc.image is not None:
            ref = doc.image_ref or default_image_ref(doc)
            if len(ref.encode()) > MAX_REF_LENGTH:
                raise InvalidRequestError(f"image_ref of '{doc.doc_id}' exceeds {MAX_REF_LENGTH} bytes")
            texts = [doc.text.strip()]
        else:
            ref = ""
            texts = chunk_text(doc.text, chunk_size=self.settings.rag.chunk_size,
                               chunk_overlap=self.settings.rag.chunk_overlap)
        rows = []
        for number, text in enumerate(texts):
            if len(text.encode()) > MAX_TEXT_LENGTH:
                raise InvalidRequestError(
                    f"Chunk {number} of '{doc.doc_id}' is {len(text.encode())} bytes; the store keeps at most "
                    f"{MAX_TEXT_LENGTH} (lower RAG_CHUNK_SIZE)"
                )
            rows.append({"id": chunk_id(doc.doc_id, number), "doc_id": doc.doc_id, "chunk_no": number,
                         "text": text, "metadata": dict(doc.metadata), "image_ref": ref})
        return rows

    async def _embed_rows(self, rows: list[dict[str, Any]], documents: list[Document]) -> None:
        texts = [embedding_text(row["text"], row["image_ref"]) for row in rows]
        vectors = await self.embedding.embed(texts, input_type="document")
        for row, vector in zip(rows, vectors, strict=True):
            row[TEXT_FIELD] = vector
        images = {doc.doc_id: doc for doc in documents if doc.image is not None}
        if not images:
            return
        assert self.multimodal is not None  # checked by _validated
        image_rows = [row for row in rows if row["doc_id"] in images]
        captioned = [row for row in image_rows if row["text"]]
        bare = [row for row in image_rows if not row["text"]]
        if captioned:
            fused = await self.multimodal.embed_fused([row["text"] for row in captioned],
                                                      [images[row["doc_id"]].image for row in captioned])
            for row, vector in zip(captioned, fused, strict=True):
                row[IMAGE_FIELD] = vector
        if bare:
            alone = await self.multimodal.embed_images([images[row["doc_id"]].image for row in bare])
            for row, vector in zip(bare, alone, strict=True):
                row[IMAGE_FIELD] = vector

    # --- query --------------------------------------------------------------------------------------------
    async def aquery(self, question: str, top_k: int | None = None, mode: Mode = "text", *,
                     answer: bool = True) -> QueryResult:
        """Ranked contexts for `question` (top_k, default RERANKER_TOP_N) and, with an LLM, an answer."""
        if not question.strip():
            raise InvalidRequestError("The question is empty")
        if mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {list(MODES)}; got {mode!r}")
        top_k = top_k if top_k is not None else self.settings.reranker.top_n
        if top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1; got {top_k}")
        limit = max(self.settings.milvus.search_limit, top_k)
        hits = await self._search(question, mode, limit)
        contexts, reranked = await self._rank(question, hits, top_k, mode)
        text = None
        if answer and self.llm is not None and contexts:
            text = await self.llm.answer(question, [c.text or (c.image_ref or "") for c in contexts])
        return QueryResult(question=question, mode=mode, contexts=contexts, answer=text, reranked=reranked)

    async def _search(self, question: str, mode: str, limit: int) -> list[Hit]:
        if mode != "text" and self.multimodal is None:
            raise ProviderDisabledError(
                f"mode '{mode}' needs multimodal embedding: set MULTIMODAL_EMBEDDING_ENABLED=true"
            )
        text_vec = image_vec = None
        if mode in ("text", "hybrid"):
            text_vec = (await self.embedding.embed([question], input_type="query"))[0]
        if mode in ("image", "hybrid"):
            assert self.multimodal is not None
            image_vec = (await self.multimodal.embed([question], input_type="query"))[0]
        if mode == "text":
            return await asyncio.to_thread(self.store.search, text_vec, field=TEXT_FIELD, limit=limit)
        if mode == "image":
            return await asyncio.to_thread(self.store.search, image_vec, field=IMAGE_FIELD, limit=limit)
        return await asyncio.to_thread(self.store.hybrid_search, text_vec, image_vec, limit=limit)

    async def _rank(self, question: str, hits: list[Hit], top_k: int, mode: str) -> tuple[list[Context], bool]:
        """Rerank text / hybrid candidates when a reranker is configured (it reads text, so not image mode)."""
        scores = [hit.score for hit in hits]
        reranked = self.reranker is not None and mode != "image" and bool(hits)
        if reranked:
            assert self.reranker is not None
            documents = [embedding_text(hit.text, hit.image_ref) for hit in hits]
            scores = [float(s) for s in await self.reranker.rerank(question, documents)]
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top_k] if hits else []
        contexts = [
            Context(id=hits[i].id, doc_id=hits[i].doc_id, chunk_no=hits[i].chunk_no, text=hits[i].text,
                    score=float(scores[i]), retrieval_score=hits[i].score, metadata=hits[i].metadata,
                    image_ref=hits[i].image_ref or None)
            for i in order
        ]
        return contexts, reranked

    def info(self) -> dict[str, Any]:
        """What /api/health may show: where the store is and what it holds (no secrets)."""
        return {"uri": self.store.uri, "collection": self.store.collection, "text_dim": self.store.text_dim,
                "image_dim": self.store.image_dim, "index_type": self.settings.milvus.index_type,
                "llm": self.llm.model if self.llm else None}

    async def close(self) -> None:
        """Close the LLM client and the store connection (not the providers: the app owns them)."""
        if self.llm is not None:
            await self.llm.close()
        await asyncio.to_thread(self.store.close)
