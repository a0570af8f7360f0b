"""Fitting a conversation into cutoff_len without training a reply that lost its question.

A conversation over cutoff_len first loses whole earliest exchanges (the rest is rendered
again, so the system prompt and the template's opening stay in front). When the last exchange
alone is still too long, its prompt and reply share the budget as LLaMA-Factory shares it: a
side that fits in half of cutoff_len keeps its length and the other gets the rest, otherwise
each gets a share in proportion to its length. Unlike LLaMA-Factory, the prompt is cut in the
middle of the user's text, so the kept prompt always holds the template's opening and system
prompt, the start of the instruction (at least `MIN_INSTRUCTION_TOKENS` of it, or half of what
the opening and header leave of a small cutoff_len) and the header that starts the reply; the
reply keeps its start. A reply cut before its end-of-turn token is
marked TRUNCATED_RESPONSE and so never learns to stop where it was cut.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import NO_TRAINABLE, TRUNCATED, TRUNCATED_RESPONSE
from corral.data.records import Record
from corral.data.templates import Template, encode_turns, last_prompt_layout, stop_token_ids

# The instruction tokens a cut prompt keeps at least (all of a shorter instruction).
MIN_INSTRUCTION_TOKENS = 16

Turns = list[tuple[list[int], list[int]]]


def fit_to_cutoff(
    turns: Turns,
    messages: list[dict],
    record: Record,
    tokenizer: Any,
    template: Template,
    data: DataConfig,
) -> tuple[Turns, str]:
    """Drop earliest exchanges, then share the budget within the last one.

    Args:
        turns: `encode_turns` of `messages`, longer than data.cutoff_len in all.
        messages: The conversation, system message first when there is one.
        record: Supplies the tool definitions for re-rendering.
        tokenizer: The model's fast tokenizer.
        template: The chat template `turns` were encoded with.
        data: Supplies cutoff_len.

    Returns:
        The turns that fit and a status: TRUNCATED, TRUNCATED_RESPONSE, or NO_TRAINABLE when
        the template's opening and headers alone leave no room for a reply (turns then []).
    """
    turns, kept = drop_earliest_turns(turns, messages, record, tokenizer, template, data)
    if total(turns) <= data.cutoff_len:
        return turns, TRUNCATED
    [(prompt, response)] = turns
    layout = last_prompt_layout(template, tokenizer, kept, tools=record.tools)
    keep_prompt, keep_response = prompt_and_reply_lengths(
        len(prompt), len(response), layout, data.cutoff_len
    )
    if keep_response < 1:
        return [], NO_TRAINABLE
    start, end = layout
    text_kept = keep_prompt - (start + len(prompt) - end)  # the rest is opening and header
    text = _whole_characters(tokenizer, prompt[start : start + text_kept])
    cut_prompt = prompt[:start] + text + prompt[end:]
    cut_response = response[:keep_response]
    stops = set(stop_token_ids(template, tokenizer))
    # Cutting only what the template writes after the end-of-turn token leaves the reply whole.
    whole = keep_response == len(response) or any(t in stops for t in cut_response)
    return [(cut_prompt, cut_response)], TRUNCATED if whole else TRUNCATED_RESPONSE


def _whole_characters(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` without the last tokens when they hold part of a character's bytes (byte-level
    BPE and SentencePiece's byte fallback split a CJK character or an emoji into several)."""
    for cut in range(len(ids), max(len(ids) - 4, 0), -1):
        if not tokenizer.decode(ids[:cut]).endswith("\ufffd"):
            return ids[:cut]
    return ids


def prompt_and_reply_lengths(
    prompt_len: int, reply_len: int, layout: tuple[int, int], cutoff_len: int
) -> tuple[int, int]:
    """How many prompt and reply tokens a too-long single exchange keeps.

    Args:
        prompt_len: Tokens in the prompt.
        reply_len: Tokens in the reply.
        layout: (start, end) of the user's text in the prompt, from `last_prompt_layout`.
        cutoff_len: The budget for both.

    Returns:
        (prompt tokens, reply tokens); the reply's count is below 1 when the prompt's fixed
        parts leave no room for it.
    """
    start, end = layout
    fixed = start + prompt_len - end  # the opening before the user's text and the header after
    # A small cutoff_len shares what the fixed parts leave between instruction and reply.
    floor = min(end - start, MIN_INSTRUCTION_TOKENS, max(1, (cutoff_len - fixed) // 2))
    least_prompt = fixed + floor
    shared_prompt, _ = share_budget(prompt_len, reply_len, cutoff_len)
    keep_prompt = min(max(shared_prompt, least_prompt), prompt_len)
    keep_reply = min(reply_len, cutoff_len - keep_prompt)
    return min(prompt_len, cutoff_len - keep_reply), keep_reply


def share_budget(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of cutoff_len between a prompt (source) and a reply (target).

    A reply shorter than half the budget keeps its length; else a prompt shorter than half
    keeps its length and the reply gets the rest; else both shrink in proportion.
    """
    if 2 * target_len < cutoff_len:
        target_budget = cutoff_len
    elif 2 * source_len < cutoff_len:
        target_budget = cutoff_len - source_len
    else:
        target_budget = int(cutoff_len * target_len / (source_len + target_len))
    target = min(target_budget, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def total(turns: Turns) -> int:
    """Tokens in all (prompt, response) pairs."""
    return sum(len(prompt) + len(response) for prompt, response in turns)


def prompt_of(turns: Turns) -> list[int]:
    """Every token before the last reply: earlier exchanges and the last exchange's prompt."""
    prompt: list[int] = []
    for earlier_prompt, earlier_reply in turns[:-1]:
        prompt += earlier_prompt + earlier_reply
    return prompt + turns[-1][0]


def drop_earliest_turns(
    turns: Turns,
    messages: list[dict],
    record: Record,
    tokenizer: Any,
    template: Template,
    data: DataConfig,
) -> tuple[Turns, list[dict]]:
    """Drop whole earliest exchanges while more than one remains and the total is too long.

    The remaining messages are rendered again (with the system prompt and the tools), so the
    template's opening (BOS, system block, tool definitions) stays in front of the first kept
    exchange. Messages are as `chat_messages` gives them (tool calls are assistant replies).

    Returns:
        The kept turns and the messages they were encoded from.
    """
    reply_ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    dropped, kept = 0, messages
    while len(turns) > 1 and total(turns) > data.cutoff_len:
        # Guess how many to drop from the token counts; the loop re-checks the rendering.
        excess, n = total(turns) - data.cutoff_len, 0
        while n < len(turns) - 1 and excess > 0:
            excess -= len(turns[n][0]) + len(turns[n][1])
            n += 1
        dropped += n
        # Start at a user message: a tool's result without the call before it answers nothing
        # (and Llama 3.1 writes the tools into the first user message).
        while dropped < len(reply_ends) - 1 and messages[reply_ends[dropped - 1]]["role"] == "tool":
            dropped += 1
        kept = head + messages[reply_ends[dropped - 1] :]
        turns = encode_turns(template, tokenizer, kept, tools=record.tools)
    return turns, kept
