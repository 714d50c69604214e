"""RAG routes: POST /api/documents (ingest), DELETE /api/documents/{doc_id}, POST /api/query."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from backend.api.deps import AUTH, RagDep, ServicesDep
from backend.api.schemas import api_image
from backend.errors import InvalidRequestError
from backend.services.rag_service import Document
from backend.services.vector_store import MAX_DOC_ID_LENGTH

router = APIRouter(prefix="/api", tags=["rag"], dependencies=AUTH)


class DocumentIn(BaseModel):
    """A text document (`text`), or an image (`image`: base64 / data URI, or what the multimodal provider's
    image settings allow) with an optional caption in `text`."""

    doc_id: str = Field(min_length=1, max_length=MAX_DOC_ID_LENGTH)
    text: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    image: str | None = None
    image_ref: str | None = Field(default=None, description="Where the image can be found again (default: doc_id)")


class IngestRequest(BaseModel):
    documents: list[DocumentIn] = Field(min_length=1)


class IngestResponse(BaseModel):
    collection: str
    documents: list[dict[str, Any]]


class DeleteResponse(BaseModel):
    doc_id: str
    deleted: int


class QueryRequest(BaseModel):
    question: str = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, le=1000, description="Contexts to return (default RERANKER_TOP_N)")
    mode: Literal["text", "image", "hybrid"] = "text"
    answer: bool = Field(default=True, description="Ask the LLM for an answer when one is configured")


class QueryResponse(BaseModel):
    question: str
    mode: str
    contexts: list[dict[str, Any]]
    answer: str | None = None
    reranked: bool = False


@router.post("/documents", response_model=IngestResponse)
async def ingest_documents(body: IngestRequest, rag: RagDep, services: ServicesDep) -> IngestResponse:
    """Chunk, embed and store the documents; a doc_id that exists is replaced."""
    limits = services.settings.backend
    if len(body.documents) > limits.max_items_per_request:
        raise InvalidRequestError(
            f"At most BACKEND_MAX_ITEMS_PER_REQUEST={limits.max_items_per_request} documents per request; "
            f"got {len(body.documents)}"
        )
    for doc in body.documents:
        if len(doc.text) > limits.max_chars_per_item:
            raise InvalidRequestError(
                f"Document '{doc.doc_id}' has {len(doc.text)} characters; at most "
                f"BACKEND_MAX_CHARS_PER_ITEM={limits.max_chars_per_item}"
            )
    # An API string is image data (base64 / data URI / allowed URL), never a path on this server.
    documents = [Document(doc_id=d.doc_id, text=d.text, metadata=d.metadata,
                          image=api_image(d.image) if d.image is not None else None, image_ref=d.image_ref)
                 for d in body.documents]
    results = await rag.ingest(documents)
    return IngestResponse(collection=rag.store.collection, documents=results)


@router.delete("/documents/{doc_id}", response_model=DeleteResponse)
async def delete_document(doc_id: str, rag: RagDep) -> DeleteResponse:
    """Remove every chunk of the document (404 when none is stored)."""
    return DeleteResponse(doc_id=doc_id, deleted=await rag.delete(doc_id))


@router.post("/query", response_model=QueryResponse)
async def query(body: QueryRequest, rag: RagDep, services: ServicesDep) -> QueryResponse:
    """Ranked contexts for the question (text, image or hybrid retrieval, then the reranker if configured)."""
    if len(body.question) > services.settings.backend.max_chars_per_item:
        raise InvalidRequestError(
            f"The question has {len(body.question)} characters; at most "
            f"BACKEND_MAX_CHARS_PER_ITEM={services.settings.backend.max_chars_per_item}"
        )
    result = await rag.aquery(body.question, body.top_k, body.mode, answer=body.answer)
    return QueryResponse(question=result.question, mode=result.mode, answer=result.answer, reranked=result.reranked,
                         contexts=[context.as_dict() for context in result.contexts])
