"""The corpus a vocabulary is learned from: text lines from .txt, .json and .jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

from corral.utils.errors import DataError

# keys whose values are text in LLaMA-Factory's demo data (alpaca, sharegpt, pretraining)
TEXT_KEYS = ("instruction", "input", "output", "text", "content", "value")


def read_corpus(files: list[str]) -> list[str]:
    """Every non-empty text of `files`: lines of plain text, or the text fields of JSON records.

    Raises:
        DataError: a file is missing, not UTF-8 (naming the byte offset), or holds no text.
    """
    texts: list[str] = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"--corpus: '{name}' is not a file")
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"--corpus: '{name}' is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
                "convert it, e.g. iconv -f GBK -t UTF-8"
            ) from err
        found = _texts(content, path)
        if not found:
            raise DataError(f"--corpus: '{name}' holds no text")
        texts.extend(found)
    return texts


def _texts(content: str, path: Path) -> list[str]:
    if path.suffix in (".json", ".jsonl"):
        try:
            records = (
                json.loads(content)
                if path.suffix == ".json"
                else [json.loads(line) for line in content.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as err:
            raise DataError(f"--corpus: '{path}' line {err.lineno}: not JSON ({err.msg})") from err
        return [text for record in records for text in _strings(record) if text.strip()]
    return [line for line in content.splitlines() if line.strip()]


def _strings(value: object) -> list[str]:
    """The text values of a record, nested conversations included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [
            s
            for key, item in value.items()
            if key in TEXT_KEYS or isinstance(item, list)
            for s in _strings(item)
        ]
    return []
