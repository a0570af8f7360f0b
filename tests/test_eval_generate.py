"""`corral eval generate`: files written, metrics in range, reruns identical, splits as
training makes them, and errors for missing splits and empty datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.config import load_config
from corral.data.loader import load_records
from corral.eval.run import run_generate, split_records
from corral.utils.errors import CorralError, DataError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("天空是什么颜色？", "天空是蓝色的。"),
    ("二加二等于几？", "二加二等于四。"),
]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _config(model: str, data_file, out, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={model}",
            f"dataset={data_file}",
            f"save_dir={out}",
            "temperature=0",
            "per_device_eval_batch_size=2",
            *extra,
        ],
    )


def _check_folder(out: Path, n: int) -> dict:
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
        "report.md",
    ]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == n
    assert {"prompt", "messages", "reference", "prediction"} <= set(rows[0])
    last = rows[0]["messages"][-1]
    assert (last["role"], last["content"]) == ("user", rows[0]["prompt"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "generate" and metrics["metrics"]["examples"] == n
    for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"):
        assert 0 <= metrics["metrics"][name] <= 100, name
    assert metrics["metrics"]["examples_per_second"] > 0
    assert "| bleu-4 |" in (out / "report.md").read_text()
    return {"rows": rows, "metrics": metrics["metrics"]}


def _quality(result: dict) -> dict:
    timing = ("seconds", "examples_per_second", "tokens_per_second")
    return {k: v for k, v in result["metrics"].items() if k not in timing}


def test_tiny_model_writes_files_and_reruns_identically(tiny_llama_dir, qa_file, tmp_path):
    extra = ("template=chatml", "max_new_tokens=8", "device=cpu")
    run_generate(_config(tiny_llama_dir, qa_file, tmp_path / "a", *extra))
    run_generate(_config(tiny_llama_dir, qa_file, tmp_path / "b", *extra))
    first, second = _check_folder(tmp_path / "a", 5), _check_folder(tmp_path / "b", 5)
    assert first["rows"] == second["rows"]
    assert _quality(first) == _quality(second)
    assert [r["reference"] for r in first["rows"]] == [a for _, a in QA]  # input order kept
    assert [r["lang"] for r in first["rows"]] == ["en", "en", "en", "zh", "zh"]
    assert all(r["completion_tokens"] <= 8 for r in first["rows"])


@pytest.mark.slow
def test_default_model_on_five_identity_examples(tmp_path):
    def config(out):
        return load_config(
            None,
            [
                "dataset=identity",
                "max_samples=5",
                f"save_dir={out}",
                "temperature=0",
                "max_new_tokens=16",
                "per_device_eval_batch_size=5",
            ],
        )

    run_generate(config(tmp_path / "a"))
    run_generate(config(tmp_path / "b"))
    first, second = _check_folder(tmp_path / "a", 5), _check_folder(tmp_path / "b", 5)
    assert first["rows"] == second["rows"]
    assert _quality(first) == _quality(second)
    assert all(row["prediction"].strip() for row in first["rows"])
    assert first["metrics"]["rouge-1"] > 0  # a real model shares words with the references


def test_validation_split_is_the_hold_out_training_makes(qa_file, tmp_path):
    config = _config("default", qa_file, tmp_path, "val_size=2", "eval_split=validation")
    held = split_records(config)
    expected = load_records(config.data, seed=config.train.seed).eval
    assert [r.source for r in held] == [r.source for r in expected] and len(held) == 2
    everything = split_records(config.replace(eval_split="all"))
    assert len(everything) == 5


def test_missing_splits_say_what_to_set(qa_file, tmp_path):
    with pytest.raises(
        DataError, match="split 'validation' is the val_size hold-out.*val_size=0.1"
    ):
        split_records(_config("default", qa_file, tmp_path, "eval_split=validation"))
    with pytest.raises(DataError, match="split 'test' scores eval_dataset, which is not set"):
        split_records(_config("default", qa_file, tmp_path, "eval_split=test"))
    test = _config("default", qa_file, tmp_path, "eval_split=test", f"eval_dataset={qa_file}")
    assert len(split_records(test)) == 5


def test_empty_dataset_and_documents_are_errors(tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty.json holds no rows"):
        run_generate(_config(tiny_llama_dir, empty, tmp_path / "out", "template=chatml"))
    docs = tmp_path / "docs.txt"
    docs.write_text("A plain document.\n")
    with pytest.raises(DataError, match="generation needs conversations.*corral eval ppl"):
        run_generate(_config(tiny_llama_dir, docs, tmp_path / "out", "template=chatml"))
    with pytest.raises(CorralError, match="pass --output DIR"):
        run_generate(load_config(None, [f"dataset={docs}"]))


def test_tool_call_references_are_scored_as_calls(tool_llama_dir, tmp_path):
    """Glaive-style rows whose reference is a function_call turn: the model (trained to call
    get_weather for Paris) is scored on parsing, the function's name and the arguments."""
    from tool_helpers import ANSWER, QUESTION, RESULT, TEMPLATE, TOOLS

    def call(name: str, **arguments) -> dict:
        return {
            "from": "function_call",
            "value": json.dumps({"name": name, "arguments": arguments}),
        }

    ask = {"from": "human", "value": QUESTION["content"]}
    tools = json.dumps([tool["function"] for tool in TOOLS])  # bare, as glaive rows hold them
    conversations = [
        [ask, call("get_weather", city="Paris")],  # the call the model learned
        [ask, call("get_weather", city="London")],  # the right function, other arguments
        [ask, call("get_time")],  # another function
        [ask, call("get_weather", city="Paris"), {"from": "observation", "value": RESULT}]
        + [{"from": "gpt", "value": ANSWER}],  # a text reply: scored as text only
    ]
    rows = [{"conversations": c, "tools": tools} for c in conversations]
    (tmp_path / "calls.json").write_text(json.dumps(rows))
    columns = {"messages": "conversations", "tools": "tools"}
    entry = {"file_name": "calls.json", "formatting": "sharegpt", "columns": columns}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"calls": entry}))
    out = tmp_path / "eval"
    extra = (f"dataset_dir={tmp_path}", f"template={TEMPLATE}", "max_new_tokens=48")
    run_generate(_config(tool_llama_dir, "calls", out, *extra))
    result = _check_folder(out, 4)
    metrics, rows = result["metrics"], result["rows"]
    assert metrics["tool_call_examples"] == 3
    assert metrics["tool_call_parse_rate"] == 1.0
    assert metrics["tool_name_accuracy"] == pytest.approx(2 / 3)
    assert metrics["tool_arguments_exact"] == pytest.approx(1 / 3)
    paris = [{"name": "get_weather", "arguments": '{"city":"Paris"}'}]
    assert [row["predicted_calls"] for row in rows[:3]] == [paris] * 3
    assert rows[1]["reference_calls"] == [{"name": "get_weather", "arguments": {"city": "London"}}]
    flags = [(r["tool_name_match"], r["tool_arguments_exact"]) for r in rows[:3]]
    assert flags == [(True, True), (True, False), (False, False)]
    assert "reference_calls" not in rows[3] and rows[3]["prediction"] == ANSWER
