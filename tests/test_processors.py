"""Processors: exact label layouts per dataset kind, cutoff truncation, lm blocks and pieces,
dropped examples counted with their reason, and the summary."""

from __future__ import annotations

import json

import pytest

from corral.config import load_config
from corral.config.fields import DataConfig
from corral.data.loader import load_records
from corral.data.processors import (
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    SPLIT,
    TRUNCATED,
    TRUNCATED_RESPONSE,
    DataStats,
    check_record_kinds,
    encode_conversations,
    encode_documents,
    finish_part,
    format_summary,
    process_records,
    processor_for,
)
from corral.data.processors.truncation import share_budget
from corral.data.records import Record
from corral.data.templates import chat_tools, get_template
from corral.data.templates.families import TEMPLATES
from corral.utils.errors import DataError

X = IGNORE_INDEX


def _data(*overrides: str):
    return load_config(None, ["dataset=unused.json", *overrides]).data


@pytest.fixture(scope="module")
def chatml(smol_tokenizer):
    return get_template("chatml", smol_tokenizer)


@pytest.fixture(scope="module")
def ids(smol_tokenizer):
    """Token ids of a piece of text, tokenized on its own (special tokens are boundaries)."""
    return lambda text: smol_tokenizer(text, add_special_tokens=False)["input_ids"]


def _user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _reply(text: str) -> str:
    return f"{text}<|im_end|>\n"


def _conversation(*texts: str, system: str | None = None) -> Record:
    roles = ["user", "assistant"] * len(texts)
    return Record(
        [{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)], system=system
    )


def _one(records, tokenizer, template, *overrides):
    [encoded] = encode_conversations(records, tokenizer, template, _data(*overrides))
    return encoded


def test_single_turn_trains_only_the_reply_and_its_end_of_turn(smol_tokenizer, chatml, ids):
    record = _conversation("What is 2+2?", "Four.", system="Be brief.")
    encoded = _one([record], smol_tokenizer, chatml)
    prompt = ids("<|im_start|>system\nBe brief.<|im_end|>\n" + _user("What is 2+2?"))
    reply = ids(_reply("Four."))
    assert encoded.input_ids == [prompt + reply]
    assert encoded.labels == [[X] * len(prompt) + reply]
    assert encoded.status == "" and encoded.tokens == len(prompt) + len(reply)


def test_multi_turn_trains_every_reply_or_only_the_last_with_mask_history(
    smol_tokenizer, chatml, ids
):
    record = _conversation("Hi", "Hello!", "Name a colour.", "Blue.")
    p1, r1 = ids(_user("Hi")), ids(_reply("Hello!"))
    p2, r2 = ids(_user("Name a colour.")), ids(_reply("Blue."))
    encoded = _one([record], smol_tokenizer, chatml)
    assert encoded.input_ids == [p1 + r1 + p2 + r2]
    assert encoded.labels == [[X] * len(p1) + r1 + [X] * len(p2) + r2]
    masked = _one([record], smol_tokenizer, chatml, "mask_history=true")
    assert masked.labels == [[X] * len(p1 + r1 + p2) + r2]


def test_train_on_prompt_trains_everything_but_the_first_token(smol_tokenizer, chatml):
    record = _conversation("Hi", "Hello!", "Name a colour.", "Blue.")
    encoded = _one([record], smol_tokenizer, chatml, "train_on_prompt=true")
    [tokens], [labels] = encoded.input_ids, encoded.labels
    assert labels == [X, *tokens[1:]]
    both = _one([record], smol_tokenizer, chatml, "train_on_prompt=true", "mask_history=true")
    trained = [i for i, label in enumerate(both.labels[0]) if label != X]
    second_prompt = len(smol_tokenizer(_user("Hi") + _reply("Hello!"))["input_ids"])
    assert trained == list(range(second_prompt, len(tokens)))  # the last turn, prompt included


def test_a_long_prompt_keeps_its_start_and_header_and_the_whole_reply(smol_tokenizer, chatml, ids):
    question = " ".join(f"word{i}" for i in range(60))
    record = _conversation(question, "Short answer.")
    whole = ids(_user(question) + _reply("Short answer."))
    head, header = ids("<|im_start|>user\n"), ids("<|im_end|>\n<|im_start|>assistant\n")
    reply = ids(_reply("Short answer."))
    encoded = _one([record], smol_tokenizer, chatml, "cutoff_len=24")
    assert encoded.status == TRUNCATED and encoded.tokens == len(whole)
    # The middle of the question goes: its start and the reply's header stay.
    kept = ids(question)[: 24 - len(head) - len(header) - len(reply)]
    assert encoded.input_ids == [head + kept + header + reply]
    assert encoded.labels == [[X] * (24 - len(reply)) + reply]


def test_earliest_exchanges_are_dropped_first_and_the_system_prompt_stays(
    smol_tokenizer, chatml, ids
):
    turns = ("First question here.", "First answer.", "Second one?", "Second.", "Third?", "3.")
    record = _conversation(*turns, system="Sys.")
    system = "<|im_start|>system\nSys.<|im_end|>\n"
    last_two = ids(
        system + _user("Second one?") + _reply("Second.") + _user("Third?") + _reply("3.")
    )
    full = ids(
        system + "".join(_user(q) + _reply(a) for q, a in zip(turns[::2], turns[1::2], strict=True))
    )
    encoded = _one([record], smol_tokenizer, chatml, f"cutoff_len={len(last_two)}")
    assert len(full) > len(last_two)
    assert encoded.status == TRUNCATED
    assert encoded.input_ids == [last_two]
    trained = [t for t, label in zip(last_two, encoded.labels[0], strict=True) if label != X]
    assert trained == ids(_reply("Second.")) + ids(_reply("3."))
    # One token less: the second exchange goes too, then the last prompt is cut from the left.
    shorter = _one([record], smol_tokenizer, chatml, f"cutoff_len={len(last_two) - 1}")
    only_last = ids(system + _user("Third?") + _reply("3."))
    assert shorter.input_ids == [only_last]


def test_a_reply_longer_than_cutoff_is_cut_from_the_right_and_learns_no_end(
    smol_tokenizer, chatml, ids
):
    answer = " ".join(f"token{i}" for i in range(40))
    record = _conversation("Count.", answer)
    prompt, reply = ids(_user("Count.")), ids(_reply(answer))
    encoded = _one([record], smol_tokenizer, chatml, "cutoff_len=16")
    assert encoded.status == TRUNCATED_RESPONSE
    # The whole (short) prompt stays; the reply keeps its start.
    assert encoded.input_ids == [prompt + reply[: 16 - len(prompt)]]
    assert encoded.labels == [[X] * len(prompt) + reply[: 16 - len(prompt)]]
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") not in encoded.labels[0]


def test_the_budget_is_shared_as_llama_factory_shares_it():
    assert share_budget(100, 20, 64) == (44, 20)  # a short reply keeps its length
    assert share_budget(20, 100, 64) == (20, 44)  # a short prompt keeps its length
    assert share_budget(100, 300, 64) == (16, 48)  # else in proportion
    assert share_budget(10, 10, 64) == (10, 10)


def test_examples_without_a_trainable_token_are_dropped_and_counted(smol_tokenizer, chatml):
    records = [
        _conversation("Hello", "Hi!"),
        Record([{"role": "user", "content": "Anyone?"}], source="demo:7"),
    ]
    records[0].source = "demo:3"
    examples, stats = process_records(
        records, _data("cutoff_len=1"), smol_tokenizer, chatml, kind="conversation"
    )
    assert len(examples) == 0
    assert stats.examples_in == 2
    assert stats.dropped == {NO_TRAINABLE: 1, NO_REPLY: 1}
    assert stats.first_dropped == {NO_TRAINABLE: "demo:3", NO_REPLY: "demo:7"}
    empty, none = process_records([], _data(), smol_tokenizer, chatml, kind="conversation")
    assert len(empty) == 0 and none.examples_in == 0


def test_process_records_gives_rows_and_stats(smol_tokenizer, chatml):
    records = [_conversation(f"Question {i}?", f"Answer {i}.") for i in range(5)]
    records.append(_conversation("Tell me a long story.", " ".join(["story"] * 50)))
    data = _data("cutoff_len=32")
    examples, stats = process_records(records, data, smol_tokenizer, chatml, kind="conversation")
    assert examples.column_names == ["input_ids", "labels", "length"]
    assert examples["length"] == [len(row) for row in examples["input_ids"]]
    assert all(row[0] == X for row in examples["labels"])
    assert stats.examples == 6 and stats.truncated == 1 and stats.truncated_responses == 1
    assert stats.length["max"] > 32 >= max(examples["length"])
    rows = finish_part(examples, stats, data, "conversation")
    assert stats.rows == 6 and stats.real_tokens == sum(examples["length"])
    assert stats.trained_tokens == sum(label != X for row in examples["labels"] for label in row)
    # Worker processes give the same rows.
    parallel, _ = process_records(
        records,
        _data("cutoff_len=32", "preprocessing_num_workers=2"),
        smol_tokenizer,
        chatml,
        kind="conversation",
    )
    assert parallel[:] == rows[:]


def test_lm_documents_are_concatenated_and_cut_into_blocks(smol_tokenizer, chatml):
    docs = ["The cat sat on the mat.", "Dogs bark at night, loudly and often.", "Fish swim."]
    data = _data("cutoff_len=8", "packing=false")
    examples, stats = process_records(
        [Record([], text=d) for d in docs], data, smol_tokenizer, chatml, kind="lm"
    )
    eos = smol_tokenizer.eos_token_id
    stream = [t for d in docs for t in [*smol_tokenizer(d)["input_ids"], eos]]
    blocks = finish_part(examples, stats, data, "lm")
    assert [t for row in blocks["input_ids"] for t in row] == stream
    assert blocks["length"][:-1] == [8] * (len(stream) // 8) and 0 < blocks["length"][-1] <= 8
    for row, labels in zip(blocks["input_ids"], blocks["labels"], strict=True):
        assert labels == [X, *row[1:]]
    assert stats.rows == len(blocks) and stats.trained_tokens == len(stream) - len(blocks)


def test_lm_packing_splits_long_documents_into_pieces(smol_tokenizer, chatml):
    long_doc = " ".join(f"w{i}" for i in range(31))
    data = _data("cutoff_len=16", "packing=true")
    encoded = encode_documents(
        [Record([], text=long_doc), Record([], text="Hi.")], smol_tokenizer, chatml, data
    )
    whole = [*smol_tokenizer(long_doc)["input_ids"], smol_tokenizer.eos_token_id]
    assert len(whole) == 84  # pieces of 16 and a last one of 4: every token kept
    assert encoded[0].status == SPLIT and encoded[0].tokens == len(whole)
    assert [t for piece in encoded[0].input_ids for t in piece] == whole
    assert all(len(piece) <= 16 for piece in encoded[0].input_ids)
    assert all(
        labels == [X, *piece[1:]]
        for piece, labels in zip(encoded[0].input_ids, encoded[0].labels, strict=True)
    )
    assert encoded[1].status == "" and len(encoded[1].input_ids) == 1
    examples, stats = process_records(
        [Record([], text=long_doc), Record([], text="Hi.")], data, smol_tokenizer, chatml, kind="lm"
    )
    rows = finish_part(examples, stats, data, "lm")
    assert stats.truncated == 1 and stats.examples == len(encoded[0].input_ids) + 1
    assert set(rows.column_names) == {"input_ids", "labels", "position_ids", "length"}
    assert max(rows["length"]) <= 16 and stats.real_tokens == len(whole) + len(
        encoded[1].input_ids[0]
    )


def test_unknown_and_planned_kinds_and_mismatched_records_are_errors(monkeypatch):
    from corral.data.processors import pipeline

    # the mechanism, whichever kinds this version has built
    monkeypatch.setattr(pipeline, "PLANNED_KINDS", ("multimodal",))
    with pytest.raises(DataError, match="'multimodal' is not implemented yet"):
        processor_for("multimodal")
    with pytest.raises(
        DataError, match="unknown dataset kind 'conversaton'.*did you mean 'conversation'"
    ):
        processor_for("conversaton")

    class Stats:
        name, part, kind = "c4", "train", "text"

    with pytest.raises(
        DataError, match="dataset 'c4' holds text records, but this stage trains on conversation"
    ):
        check_record_kinds([Stats()], "conversation")
    check_record_kinds([Stats()], "lm")


def test_summary_names_the_counts(smol_tokenizer, chatml):
    records = [_conversation("Hello", "Hi!"), _conversation("Q", " ".join(["a"] * 40))]
    records.append(Record([{"role": "user", "content": "?"}], source="demo:9"))
    data = _data("cutoff_len=20")
    examples, part = process_records(records, data, smol_tokenizer, chatml, kind="conversation")
    finish_part(examples, part, data, "conversation")
    stats = DataStats("conversation", 20, False, parts=[part])
    stats.datasets = [
        {
            "name": "demo",
            "part": "train",
            "kind": "conversation",
            "read": 4,
            "dropped": {"had no assistant reply": 1},
            "used": 3,
        }
    ]
    text = format_summary(stats)
    assert "kind conversation, cutoff_len 20, packing off" in text
    assert (
        "train dataset 'demo' (conversation): 4 read, 1 dropped; 1 had no assistant reply, 3 used"
        in text
    )
    assert "train: 3 records -> 2 examples -> 2 rows" in text
    assert f"dropped 1: {NO_REPLY} (first: demo:9)" in text
    assert (
        "1 records truncated to cutoff_len, 1 of them in the reply (no end-of-turn token trained)"
        in text
    )
    assert f"{part.real_tokens:,} real tokens, {part.trained_tokens:,} trained" in text
    assert DataStats.from_json(stats.to_json()) == stats
    json.loads(stats.to_json())


NO_TOOL_FORMAT = [name for name, t in TEMPLATES.items() if t.tool_format is None]


@pytest.mark.parametrize("name", [None, *NO_TOOL_FORMAT])
def test_tool_rows_are_dropped_by_templates_without_a_tool_format(smol_tokenizer, demo_dir, name):
    """A template with no place for tools may not train calls as other roles (a plain ChatML
    would render "<|im_start|>function_call") or drop the tool definitions silently."""
    spec = DataConfig(dataset_dir=str(demo_dir), dataset=["glaive_toolcall_en_demo"])
    glaive = load_records(spec, seed=0).train
    template = get_template(name, smol_tokenizer)  # None: SmolLM2's own, which has no tools

    encoded = encode_conversations(glaive, smol_tokenizer, template, _data())

    refused = ["chat template has no place for tools" in e.status for e in encoded]
    with_tools = [bool(chat_tools(r.tools)) or "function_call" in roles(r) for r in glaive]
    assert refused == with_tools  # rows whose tools column is "[]" and make no call train
    assert sum(with_tools) == 191 and sum("function_call" in roles(r) for r in glaive) == 153


def roles(record: Record) -> list[str]:
    return [m["role"] for m in record.messages]
