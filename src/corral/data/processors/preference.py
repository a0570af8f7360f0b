"""The "preference" kind (dpo): one prompt, a chosen and a rejected reply, trained as a pair.

Each record becomes two examples that share the prompt token for token: the conversation before
the final reply, rendered by `encode_turns` exactly as sft trains it and chat serves it, then
the chosen (first) or the rejected (second) reply. Labels are -100 on the prompt, so only the
replies' log-probabilities count. The pipeline keeps the two in one row (chosen_input_ids,
chosen_labels, rejected_input_ids, rejected_labels), so a batch always holds whole pairs.

A pair over cutoff_len is fitted as LLaMA-Factory fits it: the prompt and the longer of the two
replies share the budget (`truncation.fit_to_cutoff`, which also keeps the start of the
instruction and drops the earliest exchanges first), and both replies are cut to the length the
longer one keeps. A pair whose replies are the same teaches nothing and is dropped.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    IGNORE_INDEX,
    NO_TRAINABLE,
    Encoded,
    first_unlabelled,
)
from corral.data.processors.truncation import fit_to_cutoff, prompt_of
from corral.data.records import Record
from corral.data.templates import Template, chat_messages, encode_turns
from corral.utils.errors import CorralError

SAME_REPLIES = "chosen and rejected replies are the same"
NO_PAIR = "no chosen/rejected pair"


def encode_preferences(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """preference: per record, [prompt + chosen, prompt + rejected] with the prompt at -100."""
    return [_encode_pair(r, tokenizer, template, data) for r in records]


def _encode_pair(record: Record, tokenizer: Any, template: Template, data: DataConfig) -> Encoded:
    if record.chosen is None or record.rejected is None:
        return Encoded(status=NO_PAIR)
    if record.chosen["content"].strip() == record.rejected["content"].strip():
        return Encoded(status=SAME_REPLIES)
    prompt_messages = record.to_messages()
    pair = [prompt_messages + [dict(record.chosen)], prompt_messages + [dict(record.rejected)]]
    try:
        pair = [chat_messages(messages) for messages in pair]  # tool calls become replies
        turns = [encode_turns(template, tokenizer, m, tools=record.tools) for m in pair]
        replies = [t[-1][1] for t in turns]
        longer = 0 if len(replies[0]) >= len(replies[1]) else 1
        prompt = prompt_of(turns[longer])
        tokens = len(prompt) + len(replies[longer])
        status = ""
        if tokens > data.cutoff_len:
            fitted, status = fit_to_cutoff(
                turns[longer], pair[longer], record, tokenizer, template, data
            )
            if not fitted:
                return Encoded(status=NO_TRAINABLE, tokens=tokens)
            prompt, budget = prompt_of(fitted), len(fitted[-1][1])
            replies = [reply[:budget] for reply in replies]
    except CorralError as exc:
        return Encoded(status=str(exc))
    ids = [prompt + reply for reply in replies]
    labels = [first_unlabelled([IGNORE_INDEX] * len(prompt) + reply) for reply in replies]
    return Encoded(ids, labels, status, tokens)
