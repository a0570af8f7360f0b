"""Finding datasets (dataset_info.json, built-ins, paths) and loading them: sampling, mixing,
splitting, placeholders, and the errors a user sees (no model needed)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from corral.config.fields import DataConfig
from corral.data.loader import load_records, mix
from corral.data.records import Record
from corral.data.registry import BUILTIN_DIR, registered_names, resolve_datasets
from corral.utils.errors import DataError


def make_dataset_dir(tmp_path: Path, entries: dict, files: dict[str, list[dict] | str]) -> Path:
    """A dataset_dir with dataset_info.json and data files (rows as JSON lists, or raw text)."""
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return tmp_path


def alpaca_rows(prefix: str, n: int) -> list[dict]:
    return [
        {"instruction": f"{prefix}{i}", "input": "", "output": f"answer {prefix}{i}"}
        for i in range(n)
    ]


def prompts(records: list[Record]) -> list[str]:
    return [r.messages[0]["content"] for r in records]


def load(dataset_dir: Path, seed: int = 0, **data) -> object:
    return load_records(DataConfig(dataset_dir=str(dataset_dir), **data), seed=seed)


@pytest.fixture
def two_datasets(tmp_path) -> Path:
    entries = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    return make_dataset_dir(
        tmp_path, entries, {"a.json": alpaca_rows("a", 10), "b.json": alpaca_rows("b", 3)}
    )


# --- LLaMA-Factory's demo registry (data/), as is ------------------------------------------

DEMO = {
    # name: (rows read, record kind)
    "identity": (91, "conversation"),
    "alpaca_en_demo": (999, "conversation"),
    "alpaca_zh_demo": (1000, "conversation"),
    "dpo_en_demo": (300, "preference"),
    "kto_en_demo": (300, "unpaired_preference"),
    "glaive_toolcall_en_demo": (300, "conversation"),
    "wiki_demo": (30, "text"),
    "c4_demo": (300, "text"),
}


@pytest.mark.parametrize("name", DEMO)
def test_demo_registry_datasets_load_as_is(demo_dir, name):
    data = load(demo_dir, dataset=[name])
    read, kind = DEMO[name]
    (stats,) = data.stats
    assert (stats.read, stats.dropped, stats.used, stats.kind) == (read, {}, read, kind)
    assert {r.kind for r in data.train} == {kind}
    assert all(r.source.startswith(f"{name}:") for r in data.train)


def test_demo_contents_map_to_corral_roles(demo_dir):
    data = load(
        demo_dir,
        dataset=["glaive_toolcall_en_demo", "dpo_en_demo", "identity"],
    )
    glaive, dpo, identity = data.train[:300], data.train[300:600], data.train[600:]
    used = Counter(m["role"] for r in glaive for m in r.messages)
    assert set(used) == {"user", "assistant", "function_call", "tool"}
    assert all(r.tools and json.loads(r.tools) is not None for r in glaive)
    assert sum(r.system is not None for r in dpo) == 80  # the rows that open with a system turn
    assert all(r.messages[-1]["role"] == "user" and r.chosen["content"] for r in dpo)
    assert all("{{" not in r.messages[-1]["content"] for r in identity)
    assert any("Corral" in r.messages[-1]["content"] for r in identity)


# --- resolution ---------------------------------------------------------------------------


def test_unknown_dataset_lists_registered_names_with_a_suggestion(two_datasets):
    with pytest.raises(DataError) as e:
        resolve_datasets(["aa"], two_datasets)
    message = str(e.value)
    assert message.startswith("dataset 'aa' not found (did you mean 'a'?): not in ")
    assert message.endswith("Registered datasets: a, b, identity")


def test_unknown_dataset_without_a_registry_still_lists_builtins(tmp_path):
    with pytest.raises(
        DataError,
        match=r"identiy' not found \(did you mean 'identity'\?\): there is no .*dataset_info\.json",
    ):
        resolve_datasets(["identiy"], tmp_path)


def test_hub_only_entry_explains_how_to_download(tmp_path):
    make_dataset_dir(tmp_path, {"alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}}, {})
    with pytest.raises(DataError) as e:
        resolve_datasets(["alpaca_en"], tmp_path)
    message = str(e.value)
    assert (
        "lives on a hub (hf_hub: llamafactory/alpaca_en); corral reads local files only" in message
    )
    assert "huggingface-cli download --repo-type dataset llamafactory/alpaca_en" in message
    assert '"file_name": "alpaca_en"' in message


def test_demo_registry_hub_entries_are_refused_clearly(demo_dir):
    with pytest.raises(DataError, match="'ultrachat_200k'.*lives on a hub"):
        resolve_datasets(["ultrachat_200k"], demo_dir)
    with pytest.raises(DataError, match="maps images: corral trains on text only"):
        resolve_datasets(["mllm_demo"], demo_dir)


def test_missing_file_names_the_dataset_and_its_registry(tmp_path):
    make_dataset_dir(tmp_path, {"mine": {"file_name": "gone.json"}}, {})
    with pytest.raises(
        DataError,
        match=r"dataset 'mine': file_name points at .*gone\.json, which does not exist \(entry in .*dataset_info\.json\)",
    ):
        resolve_datasets(["mine"], tmp_path)


def test_split_other_than_train_is_refused_for_local_files(tmp_path):
    make_dataset_dir(
        tmp_path,
        {"d": {"file_name": "d.json", "split": "validation"}},
        {"d.json": alpaca_rows("x", 1)},
    )
    with pytest.raises(
        DataError, match="asks for split 'validation', but a local file has only a 'train' split"
    ):
        resolve_datasets(["d"], tmp_path)


def test_entry_typos_are_reported_with_the_closest_key(tmp_path):
    make_dataset_dir(tmp_path, {"d": {"file_nme": "d.json"}}, {})
    with pytest.raises(
        DataError, match=r"entry 'd': unknown key 'file_nme' \(did you mean 'file_name'\?\)"
    ):
        resolve_datasets(["d"], tmp_path)
    make_dataset_dir(tmp_path, {"d": {"file_name": "d.json", "columns": {"promt": "q"}}}, {})
    with pytest.raises(DataError, match=r"unknown column 'promt' \(did you mean 'prompt'\?\)"):
        resolve_datasets(["d"], tmp_path)
    make_dataset_dir(tmp_path, {"d": {"file_name": "d.json", "formatting": "sharegtp"}}, {})
    with pytest.raises(
        DataError, match=r"formatting 'sharegtp' is not one of .*\(did you mean 'sharegpt'\?\)"
    ):
        resolve_datasets(["d"], tmp_path)


def test_malformed_registry_names_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text(
        '{\n  "d": {"file_name": "d.json",}\n}', encoding="utf-8"
    )
    with pytest.raises(
        DataError, match=r"dataset_info\.json:2:31: not valid JSON \(Expecting property name"
    ):
        resolve_datasets(["d"], tmp_path)


def test_llamafactory_pretraining_entries_become_text(tmp_path):
    make_dataset_dir(
        tmp_path,
        {"c4": {"file_name": "c4.json", "columns": {"prompt": "text"}}},
        {"c4.json": [{"text": "x"}]},
    )
    (spec,) = resolve_datasets(["c4"], tmp_path)
    assert spec.formatting == "text"


@pytest.mark.parametrize(
    ("file_name", "content", "formatting", "kind"),
    [
        ("a.json", alpaca_rows("q", 2), "alpaca", "conversation"),
        (
            "s.json",
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
            "sharegpt",
            "conversation",
        ),
        (
            "o.json",
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ],
                    "label": True,
                }
            ],
            "sharegpt",
            "unpaired_preference",
        ),
        (
            "p.json",
            [
                {
                    "conversations": [{"from": "human", "value": "q"}],
                    "chosen": {"from": "gpt", "value": "y"},
                    "rejected": {"from": "gpt", "value": "n"},
                }
            ],
            "sharegpt",
            "preference",
        ),
        ("t.json", [{"text": "a document"}], "text", "text"),
        ("w.txt", "a document\nanother\n", "text", "text"),
    ],
)
def test_file_paths_are_datasets_with_a_guessed_format(
    tmp_path, file_name, content, formatting, kind
):
    path = tmp_path / file_name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    (spec,) = resolve_datasets([str(path)], tmp_path / "elsewhere")
    assert spec.formatting == formatting
    data = load_records(DataConfig(dataset=[str(path)]), seed=0)
    assert {r.kind for r in data.train} == {kind}
    # Relative to dataset_dir works too.
    assert resolve_datasets([file_name], tmp_path)[0].path == path


def test_file_with_unknown_fields_asks_for_a_registry_entry(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"q": 1, "a": 2}\n', encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"cannot tell the format from the first row \(fields: .*register the file in dataset_info\.json",
    ):
        resolve_datasets([str(path)], tmp_path)


def test_local_registry_overrides_the_builtin_identity(tmp_path):
    make_dataset_dir(
        tmp_path, {"identity": {"file_name": "mine.json"}}, {"mine.json": alpaca_rows("m", 2)}
    )
    (spec,) = resolve_datasets(["identity"], tmp_path)
    assert spec.path == tmp_path / "mine.json"
    assert registered_names(tmp_path) == ["identity"]


# --- the built-in identity dataset ----------------------------------------------------------


def test_builtin_identity_dataset(tmp_path):
    data = load(tmp_path, dataset=["identity"], identity_name="Zebra", identity_author="Acme Labs")
    rows = json.loads((BUILTIN_DIR / "identity.json").read_text(encoding="utf-8"))
    assert 60 <= len(rows) <= 100 and len(data.train) == len(rows)
    chinese = [r for r in rows if re.search(r"[\u4e00-\u9fff]", r["instruction"])]
    assert 0.35 <= len(chinese) / len(rows) <= 0.65
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert sum("{{name}}" in r["output"] for r in rows) >= 0.8 * len(rows)
    assert sum("{{author}}" in r["output"] for r in rows) >= 0.5 * len(rows)
    who = [r for r in data.train if r.messages[0]["content"].strip(" ?？").lower() == "who are you"]
    assert len(who) >= 3 and all("Zebra" in r.messages[1]["content"] for r in who)
    replies = " ".join(r.messages[1]["content"] for r in data.train)
    assert "{{" not in replies and "Acme Labs" in replies


# --- loading: sampling, placeholders, mixing, splitting -----------------------------------


def test_max_samples_keeps_the_first_n_of_each_dataset(two_datasets):
    data = load(two_datasets, dataset=["a", "b"], max_samples=4)
    assert prompts(data.train) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert [s.used for s in data.stats] == [4, 3]


def test_num_samples_samples_with_the_seed_and_repeats_when_larger(tmp_path):
    entries = {
        "few": {"file_name": "a.json", "num_samples": 4},
        "many": {"file_name": "a.json", "num_samples": 25},
    }
    make_dataset_dir(tmp_path, entries, {"a.json": alpaca_rows("a", 10)})
    few = prompts(load(tmp_path, dataset=["few"], seed=1).train)
    assert len(few) == len(set(few)) == 4
    assert few == prompts(load(tmp_path, dataset=["few"], seed=1).train)
    assert few != prompts(load(tmp_path, dataset=["few"], seed=2).train)
    many = Counter(prompts(load(tmp_path, dataset=["many"]).train))
    assert sum(many.values()) == 25 and len(many) == 10
    # max_samples then keeps the first N of the sample.
    assert prompts(load(tmp_path, dataset=["few"], seed=1, max_samples=3).train) == few[:3]


def test_placeholders_are_filled_in_every_string(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "You are {{name}}."},
                {"from": "human", "value": "Who made {{name}}?"},
                {"from": "gpt", "value": "{{author}} made me, {{name}}."},
            ]
        }
    ]
    make_dataset_dir(
        tmp_path, {"d": {"file_name": "d.json", "formatting": "sharegpt"}}, {"d.json": rows}
    )
    (record,) = load(tmp_path, dataset=["d"], identity_name="Ada", identity_author="the lab").train
    assert record.system == "You are Ada."
    assert [m["content"] for m in record.messages] == ["Who made Ada?", "the lab made me, Ada."]


def test_concat_keeps_dataset_order(two_datasets):
    data = load(two_datasets, dataset=["a", "b"])
    assert prompts(data.train) == [f"a{i}" for i in range(10)] + ["b0", "b1", "b2"]


def test_interleave_without_probabilities_alternates(two_datasets):
    under = prompts(load(two_datasets, dataset=["a", "b"], mix_strategy="interleave_under").train)
    assert under == ["a0", "b0", "a1", "b1", "a2", "b2"]
    over = prompts(load(two_datasets, dataset=["a", "b"], mix_strategy="interleave_over").train)
    assert len(over) == 20 and over[:6] == under and over[6:8] == ["a3", "b0"]


def test_interleave_with_probabilities_is_seeded(two_datasets):
    def run(strategy, seed):
        config = {"dataset": ["a", "b"], "mix_strategy": strategy, "interleave_probs": [0.5, 0.5]}
        return prompts(load(two_datasets, seed=seed, **config).train)

    under = run("interleave_under", 0)
    assert under == run("interleave_under", 0)
    assert any(run("interleave_under", seed) != under for seed in (1, 2, 3))
    # It stops right after the first dataset to run out gives its last example.
    assert under[-1] in ("a9", "b2")
    shorter = ["b0", "b1", "b2"] if under[-1] == "b2" else [f"a{i}" for i in range(10)]
    assert [p for p in under if p in shorter] == shorter
    over = run("interleave_over", 0)
    assert over == run("interleave_over", 0) and over != run("interleave_over", 1)
    assert {f"a{i}" for i in range(10)} | {"b0", "b1", "b2"} == set(over)  # every example used


def test_mix_rejects_probabilities_that_do_not_match():
    groups = [[Record([])], [Record([])]]
    with pytest.raises(DataError, match="interleave_probs has 3 values for 2 datasets"):
        mix(groups, "interleave_under", [0.2, 0.3, 0.5], seed=0)
    with pytest.raises(DataError, match="interleave_over also needs every probability above zero"):
        mix(groups, "interleave_over", [1.0, 0.0], seed=0)


def test_val_size_fraction_and_count_are_seeded_and_partition_the_data(two_datasets):
    def run(val_size, seed):
        data = load(two_datasets, seed=seed, dataset=["a", "b"], val_size=val_size)
        return prompts(data.train), prompts(data.eval)

    train, evaluation = run(0.2, 0)
    assert len(evaluation) == 3  # ceil(0.2 * 13), like datasets' train_test_split
    assert sorted(train + evaluation) == sorted([f"a{i}" for i in range(10)] + ["b0", "b1", "b2"])
    assert (train, evaluation) == run(0.2, 0)
    assert any(run(0.2, seed)[1] != evaluation for seed in (1, 2, 3))
    train, evaluation = run(5, 0)
    assert (len(train), len(evaluation)) == (8, 5)


def test_val_size_that_leaves_nothing_to_train_on(two_datasets):
    with pytest.raises(
        DataError, match="val_size 13 holds out 13 of the 13 training examples, leaving none"
    ):
        load(two_datasets, dataset=["a", "b"], val_size=13)


def test_eval_dataset_goes_to_eval(two_datasets):
    data = load(two_datasets, dataset=["a"], eval_dataset=["b"])
    assert prompts(data.eval) == ["b0", "b1", "b2"] and len(data.train) == 10
    assert [(s.name, s.part) for s in data.stats] == [("a", "train"), ("b", "eval")]
    with pytest.raises(DataError, match="set either eval_dataset or val_size, not both"):
        load(two_datasets, dataset=["a"], eval_dataset=["b"], val_size=0.1)


def test_empty_result_explains_why(tmp_path):
    rows = [{"instruction": f"q{i}", "output": ""} for i in range(12)]
    make_dataset_dir(
        tmp_path,
        {"x": {"file_name": "x.json"}, "e": {"file_name": "e.jsonl"}},
        {"x.json": rows, "e.jsonl": "\n"},
    )
    with pytest.raises(
        DataError,
        match=r"^all 12 examples of 'x' were dropped: 12 had no assistant reply \(first at x\.json:1\)$",
    ):
        load(tmp_path, dataset=["x"])
    with pytest.raises(DataError, match=r"dataset 'e' has no examples: .*e\.jsonl holds no rows"):
        load(tmp_path, dataset=["e"])
    with pytest.raises(DataError, match="no dataset given"):
        load(tmp_path)
