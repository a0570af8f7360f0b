"""Reading files and converting every source format into `Record`s (no model needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from corral.config.fields import DataConfig
from corral.data.loader import LoadedData, load_records
from corral.data.readers import list_data_files, read_rows
from corral.utils.errors import DataError


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as a JSON list (.json), JSON Lines (.jsonl), CSV or parquet, by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_entry(
    tmp_path: Path, rows: list[dict] | str, file_name: str = "d.json", **entry
) -> LoadedData:
    """Register `rows` as dataset 'd' with the given dataset_info.json entry keys and load it."""
    if isinstance(rows, str):
        (tmp_path / file_name).write_text(rows, encoding="utf-8")
    else:
        write_rows(tmp_path / file_name, rows)
    info = {"d": {"file_name": file_name, **entry}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return load_records(DataConfig(dataset=["d"], dataset_dir=str(tmp_path)), seed=0)


def roles(record) -> list[str]:
    return [m["role"] for m in record.messages]


# --- alpaca -------------------------------------------------------------------------------


def test_alpaca_without_input_uses_the_instruction_alone(tmp_path):
    data = load_entry(tmp_path, [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    (record,) = data.train
    assert record.messages == [
        {"role": "user", "content": "Name a colour.", "instruction": "Name a colour.", "input": ""},
        {"role": "assistant", "content": "Blue."},
    ]
    assert record.kind == "conversation" and record.system is None
    assert record.source == "d:2"  # the line the object starts on


def test_alpaca_with_input_joins_instruction_and_input_by_a_newline(tmp_path):
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    (record,) = load_entry(tmp_path, [row]).train
    user = record.messages[0]
    assert user["content"] == "Translate to French.\nGood morning"
    assert (user["instruction"], user["input"]) == ("Translate to French.", "Good morning")


def test_alpaca_history_becomes_earlier_turns_and_system_column_the_system(tmp_path):
    row = {
        "instruction": "And times three?",
        "output": "Twelve.",
        "history": [["What is 2+2?", "Four."], ["Double it?", "Eight."]],
        "sys": "Answer briefly.",
    }
    (record,) = load_entry(tmp_path, [row], columns={"history": "history", "system": "sys"}).train
    assert [m["content"] for m in record.messages] == [
        "What is 2+2?",
        "Four.",
        "Double it?",
        "Eight.",
        "And times three?",
        "Twelve.",
    ]
    assert roles(record) == ["user", "assistant"] * 3
    assert record.system == "Answer briefly."
    assert record.to_messages()[0] == {"role": "system", "content": "Answer briefly."}
    assert record.to_messages()[1:] == record.messages


def test_alpaca_custom_columns_like_openorca(tmp_path):
    rows = [
        {
            "question": "Why is the sky blue?",
            "response": "Rayleigh scattering.",
            "system_prompt": "Be kind.",
        }
    ]
    columns = {"prompt": "question", "response": "response", "system": "system_prompt"}
    (record,) = load_entry(tmp_path, rows, columns=columns).train
    assert record.messages[0]["content"] == "Why is the sky blue?"
    assert record.messages[1]["content"] == "Rayleigh scattering."
    assert record.system == "Be kind."


def test_alpaca_ranking_gives_chosen_and_rejected(tmp_path):
    rows = [{"instruction": "Greet me.", "chosen": "Hello!", "rejected": "Go away."}]
    columns = {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}
    (record,) = load_entry(tmp_path, rows, ranking=True, columns=columns).train
    assert roles(record) == ["user"]
    assert record.chosen == {"role": "assistant", "content": "Hello!"}
    assert record.rejected == {"role": "assistant", "content": "Go away."}
    assert record.kind == "preference"


def test_alpaca_kto_label(tmp_path):
    rows = [
        {"instruction": "2+2?", "output": "4", "label": True},
        {"instruction": "2+2?", "output": "5", "label": False},
    ]
    records = load_entry(tmp_path, rows, columns={"kto_tag": "label"}).train
    assert [r.label for r in records] == [True, False]
    assert {r.kind for r in records} == {"unpaired_preference"}


# --- sharegpt / OpenAI --------------------------------------------------------------------

TOOLS = '[{"name": "add", "parameters": {"type": "object"}}]'


def test_sharegpt_from_value_with_system_turn_tool_call_and_observation(tmp_path):
    turns = [
        {"from": "system", "value": "You can call tools."},
        {"from": "human", "value": "Add 2 and 3."},
        {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "It is 5."},
    ]
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    (record,) = load_entry(tmp_path, [{"conversations": turns, "tools": TOOLS}], **entry).train
    assert record.system == "You can call tools."
    assert roles(record) == ["user", "function_call", "tool", "assistant"]
    assert record.messages[1]["content"] == '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    assert record.tools == TOOLS


def test_sharegpt_tools_given_as_objects_become_json_text(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    tools = [{"name": "add"}]
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    (record,) = load_entry(tmp_path, [{"conversations": turns, "tools": tools}], **entry).train
    assert json.loads(record.tools) == tools


def test_openai_role_content_rows_are_recognised_without_tags(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "18C, sunny"},
            {"role": "assistant", "content": "18C and sunny."},
        ]
    }
    # Default sharegpt column is "conversations" and default tags from/value: both adapt.
    (record,) = load_entry(tmp_path, [row], formatting="sharegpt").train
    assert record.system == "Be terse."
    assert roles(record) == ["user", "function_call", "tool", "assistant"]
    assert json.loads(record.messages[1]["content"]) == {
        "name": "weather",
        "arguments": {"city": "Paris"},
    }


def test_openai_formatting_uses_role_content_defaults(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    (record,) = load_entry(tmp_path, [row], formatting="openai").train
    assert record.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
    ]


def test_sharegpt_custom_tags(tmp_path):
    row = {
        "dialog": [
            {"speaker": "customer", "utterance": "My order is late."},
            {"speaker": "agent", "utterance": "Sorry! Let me check."},
        ]
    }
    tags = {
        "role_tag": "speaker",
        "content_tag": "utterance",
        "user_tag": "customer",
        "assistant_tag": "agent",
    }
    entry = {"formatting": "sharegpt", "columns": {"messages": "dialog"}, "tags": tags}
    (record,) = load_entry(tmp_path, [row], **entry).train
    assert record.messages == [
        {"role": "user", "content": "My order is late."},
        {"role": "assistant", "content": "Sorry! Let me check."},
    ]


def test_sharegpt_preference_pairs(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be polite."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Tell me a joke."},
        ],
        "chosen": {"from": "gpt", "value": "Why did the chicken..."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    (record,) = load_entry(
        tmp_path, [row], formatting="sharegpt", ranking=True, columns=columns
    ).train
    assert record.system == "Be polite."
    assert roles(record) == ["user", "assistant", "user"]
    assert record.chosen == {"role": "assistant", "content": "Why did the chicken..."}
    assert record.rejected == {"role": "assistant", "content": "No."}
    assert record.kind == "preference"


def test_sharegpt_kto_with_role_content_tags(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "good"},
            ],
            "label": True,
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
            "label": False,
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "?"}],
            "label": "maybe",
        },
    ]
    tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
    }
    entry = {
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": tags,
    }
    data = load_entry(tmp_path, rows, **entry)
    assert [r.label for r in data.train] == [True, False]
    assert data.stats[0].dropped == {"had a label that is not true/false ('maybe')": 1}


def test_invalid_conversations_are_dropped_and_counted_with_reasons(tmp_path):
    ok = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    rows = [
        {"conversations": ok},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
            ]
        },
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]},
        {"conversations": []},
        {"conversations": ok},
    ]
    data = load_entry(tmp_path, rows, file_name="d.jsonl", formatting="sharegpt")
    stats = data.stats[0]
    assert len(data.train) == 2 and stats.read == 7 and stats.used == 2
    assert stats.dropped == {
        "had roles out of order ('user' where an assistant turn belongs)": 1,
        "had no assistant reply": 2,
        "had unknown role 'bot' (tags expect human, gpt, observation, function_call, system; "
        'set "tags" in the entry)': 1,
        "had an empty conversation": 1,
    }
    assert stats.first_dropped["had no assistant reply"] == "d.jsonl:3"
    assert "2 had no assistant reply (first at d.jsonl:3)" in stats.describe()


def test_alpaca_rows_without_reply_are_dropped(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": ""},
        {"instruction": "", "output": "d"},
    ]
    data = load_entry(tmp_path, rows, file_name="d.jsonl")
    assert len(data.train) == 1
    assert data.stats[0].dropped == {
        "had no assistant reply": 1,
        "had an empty instruction and input": 1,
    }


# --- plain text ---------------------------------------------------------------------------


def test_txt_is_one_document_per_non_empty_line(tmp_path):
    data = load_entry(tmp_path, "First doc.\n\n  \nSecond doc.\n", file_name="d.txt")
    assert [r.text for r in data.train] == ["First doc.", "Second doc."]
    assert [r.source for r in data.train] == ["d:1", "d:4"]
    assert {r.kind for r in data.train} == {"text"} and data.train[0].messages == []


def test_jsonl_text_column_llamafactory_style_and_custom_column(tmp_path):
    rows = [{"text": "doc one", "meta": 1}, {"text": "doc two", "meta": 2}]
    data = load_entry(tmp_path, rows, file_name="d.jsonl", columns={"prompt": "text"})
    assert [r.text for r in data.train] == ["doc one", "doc two"]
    rows = [{"content": "doc three"}]
    data = load_entry(
        tmp_path, rows, file_name="e.jsonl", formatting="text", columns={"prompt": "content"}
    )
    assert [r.text for r in data.train] == ["doc three"]


# --- file types ---------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi"},
    {"instruction": "Say bye", "input": "politely", "output": "Goodbye"},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_type_gives_the_same_records(tmp_path, suffix):
    data = load_entry(tmp_path, ALPACA_ROWS, file_name="d" + suffix)
    assert [r.messages for r in data.train] == [
        [
            {"role": "user", "content": "Say hi", "instruction": "Say hi", "input": ""},
            {"role": "assistant", "content": "Hi"},
        ],
        [
            {
                "role": "user",
                "content": "Say bye\npolitely",
                "instruction": "Say bye",
                "input": "politely",
            },
            {"role": "assistant", "content": "Goodbye"},
        ],
    ]


def test_parquet_keeps_nested_history(tmp_path):
    rows = [{"instruction": "c", "output": "d", "history": [["a", "b"]]}]
    (record,) = load_entry(
        tmp_path, rows, file_name="d.parquet", columns={"history": "history"}
    ).train
    assert [m["content"] for m in record.messages] == ["a", "b", "c", "d"]
    assert list(read_rows(tmp_path / "d.parquet"))[0][0] == 1  # 1-based row number


def test_read_rows_reports_the_line_each_row_starts_on(tmp_path):
    pretty = write_rows(
        tmp_path / "a.json", ALPACA_ROWS
    )  # indent=2: objects start on lines 2 and 7
    assert [line for line, _ in read_rows(pretty)] == [2, 7]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_rows(jsonl)) == [(1, {"text": "a"}), (3, {"text": "b"})]
    csv_file = tmp_path / "c.csv"
    csv_file.write_text('text,n\n"multi\nline",1\nsecond,2\n', encoding="utf-8")
    assert list(read_rows(csv_file)) == [
        (2, {"text": "multi\nline", "n": "1"}),
        (4, {"text": "second", "n": "2"}),
    ]


def test_json_file_may_hold_json_lines_or_one_object(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_rows(lines)) == [(1, {"text": "a"}), (2, {"text": "b"})]
    single = tmp_path / "single.json"
    single.write_text('\n{"text": "only"}\n', encoding="utf-8")
    assert list(read_rows(single)) == [(2, {"text": "only"})]
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "text": "a"\n}\n{\n  "text": "b"\n}\n', encoding="utf-8")
    assert list(read_rows(pretty)) == [(1, {"text": "a"}), (4, {"text": "b"})]
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    assert list(read_rows(empty)) == []


def test_folder_dataset_reads_supported_files_sorted(tmp_path):
    folder = tmp_path / "parts"
    write_rows(folder / "b.jsonl", [{"text": "from b"}])
    write_rows(folder / "a.json", [{"text": "from a"}])
    (folder / "README.md").write_text("not data", encoding="utf-8")
    (folder / ".hidden.json").write_text("broken", encoding="utf-8")
    assert [p.name for p in list_data_files(folder)] == ["a.json", "b.jsonl"]
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"d": {"file_name": "parts", "formatting": "text"}})
    )
    data = load_records(DataConfig(dataset=["d"], dataset_dir=str(tmp_path)), seed=0)
    assert [(r.text, r.source) for r in data.train] == [
        ("from a", "d:a.json:2"),
        ("from b", "d:b.jsonl:1"),
    ]


def test_alpaca_demo_reads_fast(demo_dir):
    path = demo_dir / "alpaca_en_demo.json"
    start = time.perf_counter()
    data = load_records(DataConfig(dataset=[str(path)]), seed=0)
    elapsed = time.perf_counter() - start
    assert len(data.train) == 999
    assert elapsed < 0.5, f"reading 999 alpaca examples took {elapsed:.2f}s"


# --- errors -------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n' * 6 + '{"text": "b" "c"}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.jsonl:7: not valid JSON \(Expecting ',' delimiter at column 14\)"
    ):
        list(read_rows(path))


def test_malformed_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.json:3:16: not valid JSON \(Expecting property name"
    ):
        list(read_rows(path))
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.json:3:3: not valid JSON \(Expecting ',' delimiter\)"
    ):
        list(read_rows(path))
    path.write_text('[{"text": "a"}]\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2:1: not valid JSON \(Extra data\)"):
        list(read_rows(path))
    for unfinished in ('[\n  {"text": "a"},\n', "[\n"):
        path.write_text(unfinished, encoding="utf-8")
        with pytest.raises(DataError, match=r"bad\.json:\d+:1: not valid JSON \(Expecting value\)"):
            list(read_rows(path))


def test_row_that_is_not_an_object_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  "just a string"\n]', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad\.json:3: expected an object with named fields, got str"
    ):
        list(read_rows(path))


def test_csv_row_with_too_many_values(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: 3 values for 2 columns \(a, b\)"):
        list(read_rows(path))


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"unsupported file type '\.xlsx'; corral reads \.json, \.jsonl, \.csv, \.parquet, \.txt",
    ):
        read_rows(path)


def test_missing_file_and_folder_without_data(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        read_rows(tmp_path / "nope.json")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"no data files in this folder \(found: notes\.md\)"):
        list_data_files(tmp_path / "docs")


def test_missing_default_column_lists_columns_present_and_the_fix(tmp_path):
    rows = [{"question": "q", "answer": "a", "output": "o"}]
    with pytest.raises(DataError) as e:
        load_entry(tmp_path, rows)
    assert str(e.value).startswith(
        "dataset 'd' (d.json:2): column 'instruction' not found; columns present: question, answer, output."
    )
    assert '"columns": {"prompt": "<column>"}' in str(e.value)


def test_missing_mapped_column_suggests_the_close_one(tmp_path):
    rows = [{"instruction": "q", "output": "a", "system_prompt": "s"}]
    with pytest.raises(DataError) as e:
        load_entry(tmp_path, rows, columns={"system": "system_promt"})
    message = str(e.value)
    assert "column 'system_promt' not found (did you mean 'system_prompt'?)" in message
    assert "columns present: instruction, output, system_prompt" in message
    assert (
        '"columns": {"system": "system_promt"} comes from' in message
        and "dataset_info.json" in message
    )


def test_missing_messages_column_for_sharegpt(tmp_path):
    rows = [{"dialogue": []}]
    with pytest.raises(
        DataError, match=r"column 'conversations' not found; columns present: dialogue"
    ):
        load_entry(tmp_path, rows, formatting="sharegpt")
