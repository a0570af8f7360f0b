"""Blocks into passages: whole paragraphs packed up to `chunk_size` characters, never across a
heading or a page, a long paragraph cut at sentence ends (Chinese 。！？； too), and each
passage after the first in a section starting with the previous one's last sentences (up to
`chunk_overlap` characters), so a fact split by a boundary is still found whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.kb.readers import Block

# A sentence ends after . ! ? (then a space) or after Chinese 。！？； (no space needed), or at a
# line break; the end stays with its sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n+")
_CJK_END = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]$")
_CJK_START = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")


@dataclass
class Chunk:
    text: str
    headings: tuple[str, ...]
    line_start: int | None
    line_end: int | None
    page: int | None

    def location(self) -> dict:
        """`{"page": N}` or `{"lines": "A-B"}` (empty when the reader knows neither)."""
        if self.page is not None:
            return {"page": self.page}
        if self.line_start is None:
            return {}
        span = str(self.line_start)
        if self.line_end is not None and self.line_end != self.line_start:
            span += f"-{self.line_end}"
        return {"lines": span}


def chunk_blocks(blocks: list[Block], size: int, overlap: int) -> list[Chunk]:
    """Pack `blocks` (one file's, in order) into passages of at most `size` characters."""
    chunks: list[Chunk] = []
    current: list[Block] = []
    # a long paragraph is cut small enough that the overlap still fits before each piece
    for piece in (p for block in blocks for p in _split_long(block, size - overlap - 2)):
        if current and (
            _section(current[-1]) != _section(piece)
            or len(_join(current)) + 2 + len(piece.text) > size
        ):
            chunks.append(_chunk(current))
            current = _overlap(current, piece, overlap)
        current.append(piece)
    if current:
        chunks.append(_chunk(current))
    return chunks


def _section(block: Block) -> tuple:
    return block.headings, block.page


def _join(blocks: list[Block]) -> str:
    return "\n\n".join(b.text for b in blocks)


def _chunk(blocks: list[Block]) -> Chunk:
    first, last = blocks[0], blocks[-1]
    return Chunk(_join(blocks), first.headings, first.line_start, last.line_end, first.page)


def _overlap(previous: list[Block], following: Block, overlap: int) -> list[Block]:
    """The last sentences of `previous` (at most `overlap` characters) that open the next
    passage, when it continues the same section."""
    if overlap == 0 or _section(previous[-1]) != _section(following):
        return []
    last = previous[-1]
    kept = ""
    for sentence in reversed(_sentences(last.text)):
        if len(kept) + len(sentence) + 1 > overlap:
            break
        kept = _glue(sentence, kept)
    if not kept:
        return []
    return [Block(kept, last.headings, last.line_end, last.line_end, last.page)]


def _glue(first: str, second: str) -> str:
    """Two sentences as one text: no space between Chinese ones, one between others."""
    if not first or not second:
        return first or second
    joiner = "" if _CJK_END.search(first) and _CJK_START.match(second) else " "
    return first + joiner + second


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _split_long(block: Block, size: int) -> list[Block]:
    """`block` itself when it fits, else runs of its sentences of at most `size` characters
    (a sentence longer than that is cut), each with the lines it spans."""
    if len(block.text) <= size:
        return [block]
    pieces: list[Block] = []
    start, text = 0, ""
    for match in _pieces_with_offsets(block.text, size):
        offset, sentence = match
        if text and len(text) + 1 + len(sentence) > size:
            pieces.append(_sub_block(block, start, text))
            text = ""
        if not text:
            start = offset
        text = _glue(text, sentence)
    if text:
        pieces.append(_sub_block(block, start, text))
    return pieces


def _pieces_with_offsets(text: str, size: int) -> list[tuple[int, str]]:
    pieces, position = [], 0
    for sentence in _SENTENCE_END.split(text):
        if not sentence:
            continue
        offset = text.index(sentence, position)
        position = offset + len(sentence)
        for cut in range(0, len(sentence), size):
            if sentence[cut : cut + size].strip():
                pieces.append((offset + cut, sentence[cut : cut + size].strip()))
    return pieces


def _sub_block(block: Block, offset: int, text: str) -> Block:
    if block.line_start is None:
        return Block(text, block.headings, page=block.page)
    # line of the first character; the text between is the sentences joined, so count the
    # newlines of the original span it covers
    first = block.line_start + block.text.count("\n", 0, offset)
    last = first + text.count("\n")
    span_end = block.text.find(text[-20:], offset)
    if span_end >= 0:
        last = block.line_start + block.text.count("\n", 0, span_end)
    return Block(text, block.headings, first, min(last, block.line_end or last), block.page)
