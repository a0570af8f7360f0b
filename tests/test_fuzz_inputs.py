"""Fuzzed inputs (hypothesis): random and malformed rows in every data format, and random
`key=value` overrides. The only outcomes allowed are a result or corral's own error: never
another exception, and never a row that vanished without being counted as dropped."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from corral.config.fields import DataConfig, all_fields  # noqa: E402
from corral.config.parse import load_config  # noqa: E402
from corral.data.loader import load_records  # noqa: E402
from corral.utils.errors import CorralError  # noqa: E402

FUZZ = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
# A valid first row per format: it decides the format the file is read as.
FIRST_ROWS = {
    "alpaca": {"instruction": "Say hi", "input": "", "output": "hi"},
    "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "openai": {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    },
    "preference": {"instruction": "Pick", "chosen": "good", "rejected": "bad"},
    "kto": {"instruction": "Rate", "output": "ok", "label": True},
    "text": {"text": "a document"},
}
KEYS = sorted({key for row in FIRST_ROWS.values() for key in row} | {"history", "system", "from"})

texts = st.text(max_size=30) | st.sampled_from(["", " ", "\x00", "\ud7ff", "x" * 100_000])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner),
    max_leaves=12,
)


def _turns():
    turn = st.fixed_dictionaries(
        {},
        optional={
            "from": st.sampled_from(["human", "gpt", "system", "observation", "x"]) | scalars,
            "value": json_values,
            "role": st.sampled_from(["user", "assistant", "system", "tool", "?"]) | scalars,
            "content": json_values,
        },
    )
    return st.lists(turn | json_values, max_size=5)


def _rows(fmt: str):
    """Rows shaped like `fmt` with any field missing, mistyped, huge or nested."""
    fields = {key: json_values for key in FIRST_ROWS[fmt]}
    if fmt in ("sharegpt", "openai"):
        fields = {key: _turns() | json_values for key in FIRST_ROWS[fmt]}
    shaped = st.fixed_dictionaries({}, optional=fields)
    return st.lists(shaped | json_values, max_size=8)


def _loads(path: Path, rows_written: int) -> None:
    """Load `path`; CorralError is fine, anything else fails; no row may vanish uncounted."""
    data = replace(DataConfig(), dataset=[str(path)], dataset_dir=str(path.parent))
    try:
        loaded = load_records(data, seed=0)
    except CorralError:
        return
    (stats,) = loaded.stats
    assert stats.read == rows_written, (stats.read, rows_written)
    assert len(loaded.train) + sum(stats.dropped.values()) == stats.read


@pytest.mark.parametrize("fmt", sorted(FIRST_ROWS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@FUZZ
@given(data=st.data())
def test_random_rows_in_every_format(fmt, suffix, data):
    rows = [FIRST_ROWS[fmt], *data.draw(_rows(fmt))]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(rows), encoding="utf-8")
        else:
            path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
        _loads(path, len(rows))


@FUZZ
@given(
    lines=st.lists(st.text(max_size=40) | st.binary(max_size=40).map(repr), max_size=8),
    encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"]),
)
def test_broken_jsonl_and_wrong_encodings(lines, encoding):
    good = json.dumps(FIRST_ROWS["alpaca"], ensure_ascii=False)
    text = "\n".join([good, *lines, '{"instruction": "é", "output": "ü"}'])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "broken.jsonl"
        path.write_bytes(text.encode(encoding, errors="replace"))
        written = sum(1 for line in text.split("\n") if line.strip())
        _loads(path, written)


@pytest.mark.parametrize("depth", [50, 5_000, 200_000])
def test_deeply_nested_json_is_an_error_not_a_crash(depth, tmp_path):
    nested = "[" * depth + "]" * depth
    for name, text in [
        ("deep.json", f'[{{"instruction": "a", "output": "b"}}, {{"instruction": {nested}}}]'),
        ("deep.jsonl", f'{{"instruction": "a", "output": "b"}}\n{{"output": {nested}}}'),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        _loads(path, 2)


@FUZZ
@given(
    header=st.lists(st.sampled_from([*KEYS, "", "x,y", '"']), min_size=1, max_size=4),
    cells=st.lists(st.lists(st.text(max_size=20), max_size=5), max_size=6),
)
def test_random_csv(header, cells):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["instruction", "output"])
            writer.writerow(["Say hi", "hi"])
            writer.writerow(header)
            writer.writerows(cells)
        rows = 2 + len(cells)  # header row 3 is data to the reader; empty lists are blank lines
        rows -= sum(1 for row in cells if not row)
        _loads(path, rows)


@FUZZ
@given(rows=_rows("alpaca"))
def test_random_parquet(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [FIRST_ROWS["alpaca"], *(r for r in rows if isinstance(r, dict))]
    # parquet needs one type per column: store each field as its JSON text
    columns = {key: [json.dumps(r.get(key)) if key in r else None for r in values] for key in KEYS}
    columns |= {
        key: [v[key] if i == 0 else columns[key][i] for i, v in enumerate(values)]
        for key in FIRST_ROWS["alpaca"]
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.parquet"
        pq.write_table(pa.table(columns), path)
        _loads(path, len(values))


def test_a_huge_field_loads_or_is_refused(tmp_path):
    path = tmp_path / "huge.jsonl"
    row = {"instruction": "x" * 20_000_000, "output": "y"}
    path.write_text(json.dumps(FIRST_ROWS["alpaca"]) + "\n" + json.dumps(row), encoding="utf-8")
    _loads(path, 2)


FIELDS = sorted(all_fields())
override_values = (
    st.text(max_size=20)
    | st.integers().map(str)
    | st.floats().map(str)
    | st.sampled_from(["", "null", "[", "{a: 1}", "true", "1e999", "nan", "-1", "a,b", "🦙"])
)


@pytest.mark.slow  # the first config built imports the libraries its checks use
@FUZZ
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(FIELDS) | st.text(max_size=12), override_values).map(
            lambda kv: f"{kv[0]}={kv[1]}"
        ),
        max_size=4,
    )
)
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    try:
        load_config(None, overrides)
    except CorralError as error:
        assert str(error).strip()
