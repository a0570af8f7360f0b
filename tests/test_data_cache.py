"""build_dataset and its cache: a second build tokenises nothing, every input that changes the
result invalidates it, writes are atomic, and an empty result is an error that says why."""

from __future__ import annotations

import json

import pytest

import corral.data.dataset as dataset_module
from corral.config import load_config
from corral.data.cache import cache_root
from corral.data.dataset import build_dataset
from corral.data.templates import get_template
from corral.utils.errors import DataError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    return path


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the processor (tokenisation) made by build_dataset."""
    counter = {"n": 0}
    real = dataset_module.process_records

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "process_records", counting)
    return counter


def _build(tokenizer, data_file, *overrides, template="chatml", kind="conversation"):
    data = load_config(None, [f"dataset={data_file}", "cutoff_len=64", *overrides]).data
    return build_dataset(data, tokenizer, get_template(template, tokenizer), kind=kind, seed=0)


def test_second_build_loads_the_cache_without_tokenising(
    home, alpaca_file, calls, smol_tokenizer, caplog
):
    first = _build(smol_tokenizer, alpaca_file, "val_size=1")
    assert calls["n"] == 2  # train and eval
    second = _build(smol_tokenizer, alpaca_file, "val_size=1")
    assert calls["n"] == 2
    assert second.train[:] == first.train[:] and second.eval[:] == first.eval[:]
    assert second.stats == first.stats
    assert [p.part for p in second.stats.parts] == ["train", "eval"]
    # Records are read again only when asked for, and match the first run's.
    assert second.train_records == first.train_records and len(second.eval_records) == 1
    [folder] = [p for p in cache_root().iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["eval", "stats.json", "train"]
    assert not list(cache_root().glob(".tmp-*")) and not list(cache_root().glob(".old-*"))


@pytest.mark.parametrize(
    "change",
    ["data file", "cutoff_len=48", "template=alpaca", "packing=true", "overwrite_cache=true"],
)
def test_changed_inputs_rebuild_the_cache(home, alpaca_file, calls, smol_tokenizer, change):
    _build(smol_tokenizer, alpaca_file)
    assert calls["n"] == 1
    overrides, template = [], "chatml"
    if change == "data file":
        alpaca_file.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello there!"}] * 3))
    elif change.startswith("template="):
        template = change.split("=")[1]
    else:
        overrides = [change]
    changed = _build(smol_tokenizer, alpaca_file, *overrides, template=template)
    assert calls["n"] == 2
    if change == "data file":
        assert changed.stats.parts[0].examples_in == 3
    if change == "packing=true":
        assert "position_ids" in changed.train.column_names
    # Building the changed inputs again is a cache hit (overwrite_cache always rebuilds).
    _build(smol_tokenizer, alpaca_file, *overrides, template=template)
    assert calls["n"] == (3 if change == "overwrite_cache=true" else 2)


def test_workers_do_not_change_the_cache_key(home, alpaca_file, calls, smol_tokenizer):
    _build(smol_tokenizer, alpaca_file)
    _build(smol_tokenizer, alpaca_file, "preprocessing_num_workers=2")
    assert calls["n"] == 1


def test_lm_kind_on_a_conversation_dataset_is_cached_separately(
    home, alpaca_file, calls, smol_tokenizer
):
    chat = _build(smol_tokenizer, alpaca_file)
    lm = _build(smol_tokenizer, alpaca_file, kind="lm")
    assert calls["n"] == 2
    assert lm.stats.kind == "lm" and chat.stats.kind == "conversation"
    assert lm.stats.parts[0].trained_tokens > chat.stats.parts[0].trained_tokens


def test_nothing_left_after_truncation_is_an_error_that_says_why(home, alpaca_file, smol_tokenizer):
    with pytest.raises(DataError) as error:
        _build(smol_tokenizer, alpaca_file, "cutoff_len=1")
    message = str(error.value)
    assert "no train examples are left after tokenisation: all 5 records were dropped" in message
    assert "5 no trainable token after truncation (first at" in message
    assert "cutoff_len is 1" in message and "raise it" in message
    assert not [p for p in cache_root().iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_summary_notes_where_corral_differs_from_llama_factory(
    home, tmp_path, alpaca_file, smol_tokenizer
):
    from corral.data.dataset import ALPACA_INPUT_NOTE, LM_BLOCKS_NOTE
    from corral.data.processors import format_summary

    with_input = tmp_path / "translate.json"
    rows = [{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}]
    with_input.write_text(json.dumps(rows))

    built = _build(smol_tokenizer, with_input, template="alpaca")
    assert built.stats.notes == [ALPACA_INPUT_NOTE]
    assert f"note: {ALPACA_INPUT_NOTE}" in format_summary(built.stats)
    again = _build(smol_tokenizer, with_input, template="alpaca")  # from the cache
    assert again.stats.notes == [ALPACA_INPUT_NOTE]
    assert _build(smol_tokenizer, alpaca_file, template="alpaca").stats.notes == []  # no inputs
    assert _build(smol_tokenizer, with_input, template="chatml").stats.notes == []
    pt = _build(smol_tokenizer, alpaca_file, "packing=false", kind="lm")
    assert pt.stats.notes == [LM_BLOCKS_NOTE]
    assert _build(smol_tokenizer, alpaca_file, "packing=true", kind="lm").stats.notes == []
