"""The "prompt" kind (ppo, grpo): the prompt a policy answers, and the dataset's reply if any.

Each record becomes one example: the conversation before its final reply, rendered with the
generation prompt exactly as `corral chat` renders it (`encode_prompt`), so a policy trained on
its own samples generates from what it will be served with. The dataset's reply, when the
record has one (an sft row; the chosen reply of a pair), follows the prompt with its tokens
labelled and everything else -100, so the layout is the shared one and a stage finds the
prompt as the tokens before the first label (`split_prompt`) and may score against the reply.

A prompt that alone reaches cutoff_len leaves no room to generate and is dropped, counted; a
reference reply is cut to the room left (it is never trained on).
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import IGNORE_INDEX, Encoded
from corral.data.records import Record
from corral.data.templates import Template, encode_prompt, tokenize
from corral.utils.errors import CorralError

NO_PROMPT = "no user prompt"
PROMPT_TOO_LONG = "prompt reaches cutoff_len, leaving no room to generate a reply"


def encode_prompts(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """prompt: per record, the generation prompt (-100) then the reference reply (labelled)."""
    return [_encode_prompt(r, tokenizer, template, data) for r in records]


def _encode_prompt(record: Record, tokenizer: Any, template: Template, data: DataConfig) -> Encoded:
    messages = record.to_messages()
    reply = record.chosen  # a preference pair's prompt is its messages; the chosen its reply
    if reply is None and messages and messages[-1]["role"] in ("assistant", "function_call"):
        reply = messages.pop()  # a function_call's content is the call's JSON text
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        return Encoded(status=NO_PROMPT)
    try:
        prompt = encode_prompt(template, tokenizer, messages, tools=record.tools)
        reference = tokenize(tokenizer, reply["content"])[0] if reply else []
    except CorralError as exc:
        return Encoded(status=str(exc))
    tokens = len(prompt) + len(reference)
    if len(prompt) >= data.cutoff_len:
        return Encoded(status=PROMPT_TOO_LONG, tokens=tokens)
    reference = reference[: data.cutoff_len - len(prompt)]
    labels = [IGNORE_INDEX] * len(prompt) + reference
    return Encoded([prompt + reference], [labels], "", tokens)


def split_prompt(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference reply ids) of one prompt-kind example."""
    start = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return input_ids[:start], input_ids[start:]
