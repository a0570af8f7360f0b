"""The "conversation" kind (sft): replies trained, prompts not, cut to cutoff_len.

`encode_turns` renders the conversation with the chat template; every assistant reply is
trained (only the last with mask_history; prompts too with train_on_prompt). A conversation
over cutoff_len first loses whole earliest exchanges (the rest is rendered again, so the system
prompt and the template's opening stay), then its prompt is cut from the left, keeping the text
nearest the reply, and only a reply that alone exceeds cutoff_len is cut from the right (it
then has no end-of-turn token to learn). Records with tool calls or tool definitions are
refused until a template can place them: no template may train them as something else.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    TOOL_CALLS,
    TRUNCATED,
    TRUNCATED_RESPONSE,
    Encoded,
    first_unlabelled,
)
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
        tokens = _total(turns)
        status = ""
        if tokens > data.cutoff_len:
            turns = _drop_earliest_turns(turns, messages, record, tokenizer, template, data)
            turns, status = _truncate_last_turn(turns, data.cutoff_len)
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


def _total(turns: list[tuple[list[int], list[int]]]) -> int:
    return sum(len(prompt) + len(response) for prompt, response in turns)


def _drop_earliest_turns(
    turns: list[tuple[list[int], list[int]]],
    messages: list[dict],
    record: Record,
    tokenizer: Any,
    template: Template,
    data: DataConfig,
) -> list[tuple[list[int], list[int]]]:
    """Drop whole earliest exchanges while more than one remains and the total is too long.

    The remaining messages are rendered again (with the system prompt), so the template's
    opening (BOS, system block) stays in front of the first kept exchange.
    """
    reply_ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    dropped = 0
    while len(turns) > 1 and _total(turns) > data.cutoff_len:
        # Guess how many to drop from the token counts; the loop re-checks the rendering.
        excess, n = _total(turns) - data.cutoff_len, 0
        while n < len(turns) - 1 and excess > 0:
            excess -= len(turns[n][0]) + len(turns[n][1])
            n += 1
        dropped += n
        kept = head + messages[reply_ends[dropped - 1] :]
        turns = encode_turns(template, tokenizer, kept, tools=record.tools)
    return turns


def _truncate_last_turn(
    turns: list[tuple[list[int], list[int]]], cutoff_len: int
) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Fit a conversation already reduced to what `_drop_earliest_turns` leaves.

    A single remaining turn keeps its whole reply when it fits in cutoff_len - 1 (at least one
    prompt token before it, so the reply's first token is a prediction target); its prompt is
    cut from the left. A longer reply is cut from the right.
    """
    if _total(turns) <= cutoff_len:
        return turns, TRUNCATED
    [(prompt, response)] = turns
    keep_response = min(len(response), cutoff_len - (1 if prompt else 0))
    keep_prompt = min(len(prompt), cutoff_len - keep_response)
    status = TRUNCATED_RESPONSE if keep_response < len(response) else TRUNCATED
    return [(prompt[len(prompt) - keep_prompt :], response[:keep_response])], status
