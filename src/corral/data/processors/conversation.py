"""The "conversation" kind (sft): replies trained, prompts not, cut to cutoff_len.

`encode_turns` renders the conversation with the chat template; every assistant reply is
trained (only the last with mask_history; prompts too with train_on_prompt). A conversation
over cutoff_len is fitted by `truncation.fit_to_cutoff`: earliest exchanges go first, then the
last exchange's prompt and reply share the budget, the prompt keeping its opening, the start of
the instruction and the reply's header. A tool call (a function_call turn) is a reply and is
trained like one; a tool's result is prompt; the tool definitions are rendered where the template
writes them. A template without a tool format drops such records, saying which templates have one.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    Encoded,
    first_unlabelled,
)
from corral.data.processors.truncation import fit_to_cutoff, total
from corral.data.records import Record
from corral.data.templates import Template, chat_messages, encode_turns
from corral.utils.errors import CorralError


def encode_conversations(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """conversation: prompt tokens -100, assistant replies trained, truncated to cutoff_len."""
    return [_encode_conversation(r, tokenizer, template, data) for r in records]


def _encode_conversation(
    record: Record, tokenizer: Any, template: Template, data: DataConfig
) -> Encoded:
    try:
        messages = chat_messages(record.to_messages())  # tool calls become assistant replies
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # a trailing prompt has no reply to learn; encode_turns would train it
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
