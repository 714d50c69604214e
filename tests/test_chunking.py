"""Chunking with overlap: sizes, coverage, overlap, boundaries, determinism."""

from __future__ import annotations

import re

import pytest

from backend.errors import InvalidRequestError
from backend.services.chunking import chunk_text

TEXT = " ".join(
    f"Sentence number {i} talks about topic {i % 7} and carries a few extra words for length." for i in range(60)
)


def test_short_text_is_one_chunk_and_blank_text_none() -> None:
    assert chunk_text("  A short note.  ", chunk_size=100, chunk_overlap=10) == ["A short note."]
    assert chunk_text(" \n\t ", chunk_size=100, chunk_overlap=10) == []


@pytest.mark.parametrize(("size", "overlap"), [(200, 0), (200, 50), (120, 100), (1000, 150)])
def test_chunks_respect_the_size_and_cover_every_word(size: int, overlap: int) -> None:
    chunks = chunk_text(TEXT, chunk_size=size, chunk_overlap=overlap)
    assert all(0 < len(chunk) <= size for chunk in chunks)
    assert len(chunks) >= len(TEXT) // size
    # Every word occurrence survives, in order: walking the chunks with their overlaps rebuilds the text.
    position = 0
    for chunk in chunks:
        found = TEXT.find(chunk, max(0, position - size))
        assert found != -1, "a chunk is not a verbatim slice of the text"
        assert TEXT[position:found].strip() == "", "a gap between consecutive chunks lost text"
        position = found + len(chunk)
    assert position == len(TEXT)


def test_consecutive_chunks_overlap_by_about_the_setting() -> None:
    chunks = chunk_text(TEXT, chunk_size=300, chunk_overlap=80)
    for first, second in zip(chunks, chunks[1:], strict=False):
        shared = next(n for n in range(min(len(first), len(second)), -1, -1) if first.endswith(second[:n]))
        assert 40 <= shared <= 80


def test_chunks_break_at_sentence_ends_and_start_on_words() -> None:
    chunks = chunk_text(TEXT, chunk_size=300, chunk_overlap=0)
    assert all(chunk.endswith(".") for chunk in chunks[:-1])
    words = set(re.findall(r"\S+", TEXT))
    assert all(chunk.split()[0] in words for chunk in chunks)


def test_paragraph_break_wins_over_sentence_break() -> None:
    text = "First paragraph sentence one. Sentence two is here.\n\nSecond paragraph follows with more words."
    assert chunk_text(text, chunk_size=70, chunk_overlap=0)[0] == "First paragraph sentence one. Sentence two is here."


def test_text_without_spaces_is_cut_at_the_size() -> None:
    chunks = chunk_text("x" * 250, chunk_size=100, chunk_overlap=20)
    assert [len(c) for c in chunks] == [100, 100, 90]


def test_deterministic_and_bad_settings_refused() -> None:
    assert chunk_text(TEXT, chunk_size=256, chunk_overlap=32) == chunk_text(TEXT, chunk_size=256, chunk_overlap=32)
    with pytest.raises(InvalidRequestError, match=r"chunk_overlap \(100\).*chunk_size \(100\)"):
        chunk_text(TEXT, chunk_size=100, chunk_overlap=100)
