"""Read data files into rows (plain dicts), each with the line or row it came from.

Supported: .json (a list of objects, or JSON Lines content as the HF loader accepts), .jsonl,
.csv, .parquet and .txt (one document per non-empty line, as `{"text": line}`). Errors name the
file and line so the user can open the file at the problem.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from corral.utils.errors import DataError

Row = tuple[int, dict]

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_rows(path: str | Path) -> Iterator[Row]:
    """Yield `(line, row)` for every row of a data file.

    `line` is the 1-based line where the row starts (for .parquet: the 1-based row number).

    Raises:
        DataError: a missing file, an unsupported extension, text that is not valid JSON/UTF-8,
            or a row that is not an object; the message names the file and line.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'; corral reads "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return reader(path)


def list_data_files(path: str | Path) -> list[Path]:
    """The data files behind a dataset path: the file itself, or a folder's supported files.

    Raises:
        DataError: a folder without any supported file.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    found = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not found:
        present = ", ".join(p.name for p in files[:10]) or "nothing"
        raise DataError(
            f"{path}: no data files in this folder (found: {present}); corral reads "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _json_error(path: Path, error: json.JSONDecodeError, line: int | None = None) -> DataError:
    if line is None:
        return DataError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})")
    return DataError(f"{path}:{line}: not valid JSON ({error.msg} at column {error.colno})")


def _too_deep(path: Path, line: int) -> DataError:
    # Python's JSON decoder recurses once per level: a few thousand levels exhaust the stack
    return DataError(f"{path}:{line}: JSON nested too deeply to read (thousands of levels)")


def _check_object(path: Path, line: int, row: object) -> dict:
    if not isinstance(row, dict):
        raise DataError(
            f"{path}:{line}: expected an object with named fields, got {type(row).__name__} "
            f"{json.dumps(row, ensure_ascii=False)[:60]}"
        )
    return row


def _read_json(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    start = _WHITESPACE.match(text).end()
    in_list = text.startswith("[", start)
    # Anything but a list is read as a stream of objects: JSON Lines content or a single
    # object, as the HF json loader accepts in a .json file.
    pos = _WHITESPACE.match(text, start + 1).end() if in_list else start
    if in_list and pos == len(text):
        raise _json_error(path, json.JSONDecodeError("Expecting value", text, pos))
    if in_list and text.startswith("]", pos):
        pos = _end_of_list(path, text, pos)
    yield from _json_values(path, text, pos, in_list)


def _json_values(path: Path, text: str, pos: int, in_list: bool) -> Iterator[Row]:
    """Decode objects one by one from `pos`, to know the line each one starts on."""
    decode = json.JSONDecoder().raw_decode
    line, counted = 1, 0
    while pos < len(text):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            row, end = decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        except RecursionError:
            raise _too_deep(path, line) from None
        yield line, _check_object(path, line, row)
        pos = _WHITESPACE.match(text, end).end()
        if not in_list:
            continue
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
            if pos == len(text):  # the file ends inside the list
                raise _json_error(path, json.JSONDecodeError("Expecting value", text, pos))
        elif text.startswith("]", pos):
            pos = _end_of_list(path, text, pos)
        else:
            raise _json_error(path, json.JSONDecodeError("Expecting ',' delimiter", text, pos))


def _end_of_list(path: Path, text: str, pos: int) -> int:
    """Past the closing bracket at `pos`; only whitespace may follow it."""
    rest = _WHITESPACE.match(text, pos + 1).end()
    if rest != len(text):
        raise _json_error(path, json.JSONDecodeError("Extra data", text, rest))
    return rest


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, line=number) from None
        except RecursionError:
            raise _too_deep(path, number) from None
        yield number, _check_object(path, number, row)


def _read_jsonl(path: Path) -> Iterator[Row]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield from _json_lines(path, f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_txt(path: Path) -> Iterator[Row]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, {"text": line}


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None:  # an empty file
                return
            start = reader.line_num + 1
            for row in reader:
                if None in row:
                    raise DataError(
                        f"{path}:{start}: {len(reader.fieldnames) + len(row[None])} values for "
                        f"{len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)})"
                    )
                yield start, row
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`; only parquet needs it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


_READERS: dict[str, Callable[[Path], Iterator[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
SUPPORTED_SUFFIXES = tuple(_READERS)
