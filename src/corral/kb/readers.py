"""Documents into blocks: paragraphs (or rows, records) with where they came from.

Each reader turns one file into `Block`s — a paragraph of text, the heading path above it, and
its first/last line (text formats; .docx counts paragraphs as lines) or its page (PDF). A file
that cannot be used raises `Skip` with the reason, which `corral kb add` counts and reports.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from corral.utils.deps import require

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv", ".json", ".jsonl")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


class Skip(Exception):
    """A file that is not indexed; the message says why."""


@dataclass
class Block:
    text: str
    headings: tuple[str, ...] = ()
    line_start: int | None = None
    line_end: int | None = None
    page: int | None = None


def read_blocks(path: Path, data: bytes) -> list[Block]:
    """The blocks of the file at `path`, whose bytes are `data`.

    Raises:
        Skip: unsupported type, empty, binary, not UTF-8, invalid JSON, encrypted or
            unreadable PDF/DOCX, or no text at all.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise Skip(f"unsupported file type '{suffix or path.name}'")
    if not data.strip():
        raise Skip("empty file")
    if suffix == ".pdf":
        blocks = _pdf(data)
    elif suffix == ".docx":
        blocks = _docx(data)
    else:
        text = _text(data)
        readers = {".html": _html, ".htm": _html, ".csv": _csv, ".jsonl": _jsonl, ".json": _json}
        blocks = readers.get(suffix, _markdown)(text)
    blocks = [b for b in blocks if b.text.strip()]
    if not blocks:
        raise Skip("no text found")
    return blocks


def _text(data: bytes) -> str:
    if b"\0" in data[:8192]:
        raise Skip("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Skip(f"not UTF-8 text (byte {exc.start})") from None


def _markdown(text: str) -> list[Block]:
    """Paragraphs (runs of non-blank lines) under their Markdown headings (# ...); plain
    text is Markdown without headings."""
    blocks: list[Block] = []
    headings: list[str] = []
    lines: list[str] = []
    start = 0

    def flush(end: int) -> None:
        if lines:
            blocks.append(Block("\n".join(lines), tuple(headings), start, end))
            lines.clear()

    for number, line in enumerate(text.splitlines(), 1):
        heading = _MD_HEADING.match(line)
        if heading or not line.strip():
            flush(number - 1)
            if heading:
                level = len(heading.group(1))
                headings[level - 1 :] = [heading.group(2)]
            continue
        if not lines:
            start = number
        lines.append(line)
    flush(len(text.splitlines()))
    return blocks


def _html(text: str) -> list[Block]:
    bs4 = require("bs4")
    soup = bs4.BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    blocks: list[Block] = []
    headings: list[str] = []
    for tag in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td"]):
        words = " ".join(tag.get_text(" ").split())
        if tag.name.startswith("h"):
            headings[int(tag.name[1]) - 1 :] = [words]
        elif words and not tag.find_parent(["p", "li", "pre", "td"]):
            blocks.append(Block(words, tuple(headings), tag.sourceline, tag.sourceline))
    if not blocks and soup.get_text().strip():  # text outside paragraph tags
        return _markdown(soup.get_text("\n"))
    return blocks


def _csv(text: str) -> list[Block]:
    """One block per row, written `column: value; ...` so each row carries its header."""
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise Skip(f"invalid CSV ({exc})") from None
    header, blocks = rows[0], []
    for number, row in enumerate(rows[1:], 2):
        cells = [f"{h}: {v}" for h, v in zip(header, row, strict=False) if v.strip()]
        blocks.append(Block("; ".join(cells), (), number, number))
    return blocks


def _jsonl(text: str) -> list[Block]:
    blocks = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise Skip(f"invalid JSON on line {number} ({exc})") from None
        blocks.append(Block(_flat_json(record), (), number, number))
    return blocks


def _json(text: str) -> list[Block]:
    try:
        json.loads(text)
    except ValueError as exc:
        raise Skip(f"invalid JSON ({exc})") from None
    return _markdown(text)


def _flat_json(record: object) -> str:
    if isinstance(record, dict):
        return "; ".join(f"{k}: {_flat_json(v)}" for k, v in record.items())
    if isinstance(record, str):
        return record
    return json.dumps(record, ensure_ascii=False)


def _pdf(data: bytes) -> list[Block]:
    pypdf = require("pypdf")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Skip("encrypted PDF (needs a password)")
        blocks = []
        for number, page in enumerate(reader.pages, 1):
            for paragraph in re.split(r"\n\s*\n", page.extract_text() or ""):
                blocks.append(Block(paragraph.strip(), (), page=number))
    except Skip:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files
        raise Skip(f"unreadable PDF ({type(exc).__name__}: {exc})") from None
    return blocks


def _docx(data: bytes) -> list[Block]:
    docx = require("docx")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # a zip that is not a Word file, a damaged one
        raise Skip(f"unreadable DOCX ({type(exc).__name__}: {exc})") from None
    blocks: list[Block] = []
    headings: list[str] = []
    for number, paragraph in enumerate(document.paragraphs, 1):
        style = paragraph.style.name if paragraph.style is not None else ""
        if style.startswith("Heading") and style[8:].strip().isdigit():
            headings[int(style[8:]) - 1 :] = [paragraph.text.strip()]
        elif paragraph.text.strip():
            blocks.append(Block(paragraph.text.strip(), tuple(headings), number, number))
    return blocks
