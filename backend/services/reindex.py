"""Re-index: re-embed every stored chunk with the configured providers into a new collection, then switch.

The online -> local migration of this product: the collection behind MILVUS_COLLECTION_NAME (an alias) was built
by one embedding model; after EMBEDDING_* points at another, the backend refuses to start (dimension guard) until
this job has run. It
1. picks the target `<name>_v<N+1>` (or resumes an unfinished one left by an interrupted run),
2. copies every row in batches: same key, doc_id, chunk_no, text, metadata; `text_vec` from the configured
   embedding provider; `image_vec` copied when the image width is unchanged, else re-embedded from `image_ref`
   (a readable file) with the multimodal provider; rows already in the target are skipped (resumable),
3. verifies that the keys and texts of target and source are identical (rows deleted from the source meanwhile
   are removed from the target), and only then moves the alias. The old collection stays until dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from backend.config import Settings
from backend.errors import ConfigurationError
from backend.providers.base import BaseEmbeddingProvider, BaseMultimodalEmbeddingProvider
from backend.services.rag_service import embedding_text
from backend.services.vector_store import (
    IMAGE_FIELD,
    TEXT_FIELD,
    MilvusVectorStore,
    active_collection,
    collection_dims,
    connect,
    create_collection,
    quote,
    versioned_collections,
)

logger = logging.getLogger(__name__)


@dataclass
class ReindexResult:
    logical: str
    source: str
    target: str
    rows: int
    embedded: int  # rows embedded by this run (fewer than `rows` when it resumed)
    resumed: bool


def _version(name: str) -> int:
    return int(name.rsplit("_v", 1)[1])


def _digest(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {str(r["id"]): hashlib.sha256(str(r["text"]).encode()).hexdigest() for r in rows}


class Reindexer:
    """One re-index run against the store at settings.milvus_uri (see the module docstring)."""

    def __init__(self, settings: Settings, embedding: BaseEmbeddingProvider | None, *,
                 multimodal: BaseMultimodalEmbeddingProvider | None = None, batch_size: int = 64,
                 reembed_images: bool = False, drop_images: bool = False, progress: bool = True,
                 say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.config = settings.milvus
        self.embedding = embedding
        self.multimodal = multimodal
        self.batch_size = batch_size
        self.reembed_images = reembed_images
        self.drop_images = drop_images
        self.progress = progress
        self.say = say
        token = self.config.token.get_secret_value() if self.config.token else None
        self.client = connect(settings.milvus_uri, token, timeout=self.config.request_timeout)

    def close(self) -> None:
        self.client.close()

    # --- planning -----------------------------------------------------------------------------------------
    def _store(self, name: str) -> MilvusVectorStore:
        text_dim, image_dim = collection_dims(self.client, name)
        return MilvusVectorStore(self.client, name, self.config, uri=self.settings.milvus_uri, text_dim=text_dim,
                                 image_dim=image_dim)

    def source(self) -> MilvusVectorStore:
        logical = self.config.collection_name
        name = active_collection(self.client, logical)
        if name is None:
            raise ConfigurationError(f"Nothing to re-index: no collection '{logical}' at {self.settings.milvus_uri}")
        if name == logical:
            raise ConfigurationError(
                f"'{logical}' is a plain collection, not an alias made by this backend; re-index needs "
                f"'{logical}' to be an alias of '{logical}_v<N>'"
            )
        return self._store(name)

    def target(self, source: MilvusVectorStore) -> tuple[MilvusVectorStore, bool]:
        """An unfinished newer version with the wanted widths (resume), else a new `<name>_v<N+1>`."""
        if self.embedding is None:
            raise ConfigurationError("Re-indexing needs the configured embedding provider")
        text_dim = self.embedding.embedding_dim
        image_dim = self.multimodal.embedding_dim if self.multimodal is not None else None
        versions = versioned_collections(self.client, self.config.collection_name)
        newer = [name for number, name in sorted(versions.items()) if number > _version(source.collection)]
        if newer:
            dims = collection_dims(self.client, newer[-1])
            if dims != (text_dim, image_dim):
                raise ConfigurationError(
                    f"An unfinished re-index target '{newer[-1]}' has widths {dims}, the configuration needs "
                    f"{(text_dim, image_dim)}: drop it with `python scripts/reindex.py --drop {newer[-1]}`"
                )
            return self._store(newer[-1]), True
        name = f"{self.config.collection_name}_v{max(versions) + 1}"
        create_collection(self.client, name, self.config, text_dim=text_dim, image_dim=image_dim)
        return self._store(name), False

    # --- the copy -----------------------------------------------------------------------------------------
    async def run(self) -> ReindexResult:
        """Copy, verify, switch. Raises (leaving the alias untouched) on any failure; a re-run resumes."""
        source = await asyncio.to_thread(self.source)
        total = await asyncio.to_thread(source.count)
        images = await asyncio.to_thread(source.count, "has_image == true") if source.multimodal else 0
        if images and self.multimodal is None and not self.drop_images:
            raise ConfigurationError(
                f"'{source.collection}' holds {images} image chunks but MULTIMODAL_EMBEDDING_ENABLED is false: "
                "enable it, or pass --drop-images to keep those chunks as text only"
            )
        target, resumed = await asyncio.to_thread(self.target, source)
        self.say(f"re-indexing {total} chunks: {source.collection} ({source.text_dim}-d) -> {target.collection} "
                 f"({target.text_dim}-d){' (resuming)' if resumed else ''}")
        fields = ["id", "doc_id", "chunk_no", "text", "metadata"] + (
            ["has_image", "image_ref", IMAGE_FIELD] if source.multimodal else [])
        embedded = 0
        bar = tqdm(total=total, unit="chunk", disable=not self.progress)
        batches = source.iterate(fields, batch_size=self.batch_size)
        try:
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                done = {row["id"] for row in await asyncio.to_thread(target.get, [r["id"] for r in batch], ["id"])}
                todo = [row for row in batch if row["id"] not in done]
                if todo:
                    await asyncio.to_thread(target.upsert, await self._rows(todo, source, target))
                    embedded += len(todo)
                bar.update(len(batch))
        finally:
            batches.close()
            bar.close()
        await asyncio.to_thread(target.flush)
        await asyncio.to_thread(self._verify, source, target)
        await asyncio.to_thread(self.client.alter_alias, target.collection, self.config.collection_name)
        self.say(f"switched '{self.config.collection_name}' -> {target.collection}. The old collection "
                 f"{source.collection} is kept; drop it with `python scripts/reindex.py --drop {source.collection}`")
        return ReindexResult(self.config.collection_name, source.collection, target.collection, total, embedded,
                             resumed)

    async def _rows(self, rows: list[dict[str, Any]], source: MilvusVectorStore,
                    target: MilvusVectorStore) -> list[dict[str, Any]]:
        texts = [embedding_text(row["text"], row.get("image_ref") or "") for row in rows]
        assert self.embedding is not None  # checked by target()
        vectors = await self.embedding.embed(texts, input_type="document")
        out = []
        for row, vector in zip(rows, vectors, strict=True):
            new = {key: row[key] for key in ("id", "doc_id", "chunk_no", "text", "metadata")}
            new[TEXT_FIELD] = vector
            if target.multimodal and row.get("has_image"):
                new["image_ref"] = row["image_ref"]
                if source.image_dim == target.image_dim and not self.reembed_images:
                    new[IMAGE_FIELD] = row[IMAGE_FIELD]
                else:
                    new[IMAGE_FIELD] = await self._embed_image(row)
            out.append(new)
        return out

    async def _embed_image(self, row: dict[str, Any]) -> Any:
        assert self.multimodal is not None
        ref = row["image_ref"]
        if row["text"]:
            vectors = await self.multimodal.embed_fused([row["text"]], [ref])
        else:
            vectors = await self.multimodal.embed_images([ref])  # InvalidImageError names an unreadable ref
        return vectors[0]

    def _verify(self, source: MilvusVectorStore, target: MilvusVectorStore) -> None:
        """Same keys and texts in both; rows deleted from the source during the run are removed from the target."""
        def read(store: MilvusVectorStore) -> dict[str, str]:
            digests: dict[str, str] = {}
            for batch in store.iterate(["id", "text"], batch_size=1000):
                digests.update(_digest(batch))
            return digests

        want, have = read(source), read(target)
        extra = sorted(set(have) - set(want))
        for start in range(0, len(extra), 1000):
            ids = ", ".join(quote(i) for i in extra[start:start + 1000])
            target.client.delete(target.collection, filter=f"id in [{ids}]")
            for key in extra[start:start + 1000]:
                del have[key]
        if have != want:
            missing = sorted(set(want) - set(have))[:5]
            changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]
            raise ConfigurationError(
                f"Re-index verification failed ({target.collection} vs {source.collection}): missing {missing}, "
                f"changed text {changed}. Nothing was switched; run the re-index again to resume."
            )
        if target.count() != source.count():
            raise ConfigurationError(
                f"Re-index verification failed: {target.count()} rows in {target.collection}, "
                f"{source.count()} in {source.collection}. Nothing was switched; run again to resume."
            )

    # --- housekeeping -------------------------------------------------------------------------------------
    def status(self) -> list[str]:
        logical = self.config.collection_name
        active = active_collection(self.client, logical)
        lines = [f"'{logical}' -> {active or '(none)'} at {self.settings.milvus_uri}"]
        for _, name in sorted(versioned_collections(self.client, logical).items()):
            text_dim, image_dim = collection_dims(self.client, name)
            count = self._store(name).count() if name == active else None
            lines.append(f"  {name}: text {text_dim}-d, image {image_dim or '-'}"
                         + (f", {count} chunks (active)" if count is not None else ""))
        return lines

    def drop(self, name: str) -> None:
        """Drop an old or unfinished version; the active collection is refused."""
        logical = self.config.collection_name
        if name == active_collection(self.client, logical) or name == logical:
            raise ConfigurationError(f"'{name}' is the active collection of '{logical}'; refusing to drop it")
        if name not in versioned_collections(self.client, logical).values():
            raise ConfigurationError(f"'{name}' is not a version of '{logical}'")
        self.client.drop_collection(name)
        self.say(f"dropped {name}")
