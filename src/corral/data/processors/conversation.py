"""The "conversation" kind (sft): replies trained, prompts not, cut to cutoff_len.

`encode_turns` renders the conversation with the chat template; every assistant reply is
trained (only the last with mask_history; prompts too with train_on_prompt). A conversation
over cutoff_len is fitted by `truncation.fit_to_cutoff`: earliest exchanges go first, then the
last exchange's prompt and reply share the budget, the prompt keeping its opening, the start of
the instruction and the reply's header. Records with tool calls are refused until a template
can place them (no template may train them as something else).
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    TOOL_CALLS,
    Encoded,
    first_unlabelled,
)
from corral.data.processors.truncation import fit_to_cutoff, total
from corral.data.records import Record
from corral.data.templates import Template, encode_turns
from corral.utils.errors import CorralError

# The record roles of a tool call and its result (see corral.data.records).
TOOL_ROLES = ("function_call", "tool")


def encode_conversations(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """conversation: prompt tokens -100, assistant replies trained, truncated to cutoff_len."""
    return [_encode_conversation(r, tokenizer, template, data) for r in records]


def _encode_conversation(
    record: Record, tokenizer: Any, template: Template, data: DataConfig
) -> Encoded:
    messages = record.to_messages()
    if record.tools or any(m["role"] in TOOL_ROLES for m in messages):
        return Encoded(status=TOOL_CALLS)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a trailing prompt has no reply to learn; encode_turns would train it
    try:
        turns = encode_turns(template, tokenizer, messages, tools=record.tools)
        if not turns:
            return Encoded(status=NO_REPLY)
        tokens = total(turns)
        status = ""
        if tokens > data.cutoff_len:
            turns, status = fit_to_cutoff(turns, messages, record, tokenizer, template, data)
    except CorralError as exc:
        return Encoded(status=str(exc))
    ids, labels = label_turns(
        turns, train_on_prompt=data.train_on_prompt, mask_history=data.mask_history
    )
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded(status=NO_TRAINABLE, tokens=tokens)
    return Encoded([ids], [labels], status, tokens)


def label_turns(
    turns: list[tuple[list[int], list[int]]], *, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    """Concatenate (prompt, response) pairs into input_ids and aligned labels.

    Responses are trained (with mask_history only the last turn's), prompts only with
    train_on_prompt (in trained turns); the first label is always -100.
    """
    ids: list[int] = []
    labels: list[int] = []
    last = len(turns) - 1
    for k, (prompt, response) in enumerate(turns):
        trained = not mask_history or k == last
        ids += prompt
        ids += response
        labels += prompt if trained and train_on_prompt else [IGNORE_INDEX] * len(prompt)
        labels += response if trained else [IGNORE_INDEX] * len(response)
    return ids, first_unlabelled(labels)
