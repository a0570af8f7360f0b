"""Truncation over LLaMA-Factory's demo data: a trained reply keeps its question.

For every example cut to cutoff_len, on SmolLM2's byte-level BPE (its own template) and Llama 2's
SentencePiece tokenizer (llama2 and alpaca templates): the trained reply is preceded by the
header that starts it and by the start of its instruction, it is the start of the whole reply,
a reply cut short trains no end-of-turn token, and the summary counts what was cut.
"""

from __future__ import annotations

import pytest

from conftest import LLAMA2_TOKENIZER
from corral.config.fields import DataConfig
from corral.data.loader import load_records
from corral.data.processors import (
    IGNORE_INDEX,
    NO_TRAINABLE,
    TRUNCATED,
    TRUNCATED_RESPONSE,
    encode_conversations,
    process_records,
)
from corral.data.templates import encode_turns, get_template, stop_token_ids

DATASETS = ("alpaca_en_demo", "alpaca_zh_demo", "identity")
# (template, the text that ends every prompt: the header that starts the reply)
CASES = {
    "smollm2": (None, "<|im_end|>\n<|im_start|>assistant\n"),
    "llama2": ("llama2", " [/INST]"),
    "llama2-alpaca": ("alpaca", "\n\n### Response:\n"),
}


@pytest.fixture(scope="module")
def llama2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def demo_records(demo_dir):
    return {
        name: load_records(DataConfig(dataset_dir=str(demo_dir), dataset=[name]), seed=0).train
        for name in DATASETS
    }


def _instruction(record) -> str:
    """The first characters of the last user message (what a cut prompt must keep)."""
    users = [m for m in record.messages if m["role"] == "user"]
    return users[-1].get("instruction", users[-1]["content"]).strip()[:3]


def _trained_span(labels: list[int]) -> tuple[int, int]:
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return trained[0], trained[-1] + 1


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_a_cut_example_keeps_its_header_and_the_start_of_its_instruction(
    case, dataset, demo_records, smol_tokenizer, llama2_tokenizer
):
    tokenizer = smol_tokenizer if case == "smollm2" else llama2_tokenizer
    name, header = CASES[case]
    template = get_template(name, tokenizer)
    stops = set(stop_token_ids(template, tokenizer))
    records = demo_records[dataset]
    whole = [encode_turns(template, tokenizer, r.to_messages()) for r in records]
    for cutoff in (64, 512):
        data = DataConfig(dataset=[dataset], cutoff_len=cutoff)
        encoded = encode_conversations(records, tokenizer, template, data)
        counts = {TRUNCATED: 0, TRUNCATED_RESPONSE: 0, NO_TRAINABLE: 0}
        for record, turns, example in zip(records, whole, encoded, strict=True):
            [(prompt, response)] = turns  # the demo sets are single-turn
            if len(prompt) + len(response) <= cutoff:
                assert example.status == "" and example.input_ids == [prompt + response]
                continue
            counts[example.status] += 1
            if example.status == NO_TRAINABLE:
                continue
            [ids], [labels] = example.input_ids, example.labels
            first, end = _trained_span(labels)
            assert len(ids) <= cutoff and end == len(ids)
            kept = ids[first:]
            assert kept == response[: len(kept)]  # the start of the reply
            before = tokenizer.decode(ids[:first])
            assert before.endswith(header), (record.source, cutoff, before[-80:])
            assert _instruction(record) in before, (record.source, cutoff, before)
            assert ids[:3] == prompt[:3]  # the template's opening stays
            if len(kept) < len(response):
                cut_short = not stops.intersection(kept)
                assert (example.status == TRUNCATED_RESPONSE) == cut_short
        _, stats = process_records(records, data, tokenizer, template, kind="conversation")
        assert stats.truncated == counts[TRUNCATED] + counts[TRUNCATED_RESPONSE]
        assert stats.truncated_responses == counts[TRUNCATED_RESPONSE]
        assert stats.dropped.get(NO_TRAINABLE, 0) == counts[NO_TRAINABLE]
