"""The `Template` record: a Hugging Face chat template and the words that end a reply."""

from __future__ import annotations

from dataclasses import dataclass

TOKENIZER_TEMPLATE = "tokenizer"
EOS = "{eos}"  # in stop words: the tokenizer's eos token


@dataclass(frozen=True)
class Template:
    """A chat template and the words that end an assistant reply.

    Attributes:
        name: e.g. "chatml", or "tokenizer" for the tokenizer's own chat template.
        jinja: the Hugging Face chat template, rendered by `tokenizer.apply_chat_template`.
        stop_words: strings that end an assistant reply; "{eos}" stands for the tokenizer's
            eos token (`get_template` returns them resolved).
        default_system: the system prompt used when a conversation has none. Named templates
            also write it into `jinja`, so an exported template behaves the same without corral.
        tool_format: how `jinja` writes tool definitions, tool calls and tool results (one of
            `tools.TOOL_FORMATS`, e.g. "qwen"), so replies can be parsed back into calls; None
            when the template has no place for tools.
    """

    name: str
    jinja: str
    stop_words: tuple[str, ...]
    default_system: str | None = None
    tool_format: str | None = None
