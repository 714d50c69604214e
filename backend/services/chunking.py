"""Splitting documents into overlapping chunks (RAG_CHUNK_SIZE / RAG_CHUNK_OVERLAP, in characters).

Chunks end at a paragraph, sentence or word boundary when one lies in the back half of the window, else at the
size limit. Each chunk after the first starts `overlap` characters (rounded forward to a word start) before the
previous one ended, so a sentence cut at a boundary still appears whole in one chunk. Deterministic: the same
text and settings always give the same chunks, which is what makes re-ingesting idempotent.
"""

from __future__ import annotations

import re

from backend.errors import InvalidRequestError

# Preferred break points, best first: paragraph end, sentence end, any whitespace.
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"[.!?。！？]\s"), re.compile(r"\s"))


def chunk_text(text: str, *, chunk_size: int, chunk_overlap: int) -> list[str]:
    """Split `text` into chunks of at most `chunk_size` characters overlapping by about `chunk_overlap`.

    Whitespace-only text gives []. Chunks are stripped of surrounding whitespace; every non-space character of
    the text is in at least one chunk.
    """
    if chunk_size <= 0 or chunk_overlap < 0 or chunk_overlap >= chunk_size:
        raise InvalidRequestError(
            f"chunk_overlap ({chunk_overlap}) must be >= 0 and smaller than chunk_size ({chunk_size}) > 0"
        )
    chunks: list[str] = []
    start = _skip_space(text, 0)
    while start < len(text):
        end = min(start + chunk_size, len(text))
        if end < len(text):
            end = _break_point(text, start, end)
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        start = _next_start(text, start, end, chunk_overlap)
    return chunks


def _break_point(text: str, start: int, end: int) -> int:
    """The best boundary in the back half of text[start:end] (exclusive end index), else `end`."""
    floor = start + (end - start) // 2
    window = text[floor:end]
    for pattern in _BREAKS:
        matches = list(pattern.finditer(window))
        if matches:
            return floor + matches[-1].end()
    return end


def _next_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the next chunk begins: `overlap` characters before `end`, moved forward to a word start."""
    candidate = max(end - overlap, start + 1)
    if candidate < end and candidate > 0 and not text[candidate - 1].isspace():
        space = re.compile(r"\s").search(text, candidate, end)
        candidate = space.end() if space else candidate
    return _skip_space(text, candidate)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index
