"""The one internal record every dataset becomes before any tokenisation.

Alpaca rows, ShareGPT/OpenAI conversations, preference pairs, KTO examples and plain documents
all turn into a `Record`; processors and templates only ever see records. Roles are corral's
own: "user", "assistant", "function_call" (the assistant calling a tool) and "tool" (the
tool's answer). The system prompt is kept apart from the turns so a template can fall back to
its default system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "assistant", "function_call", "tool")

# What a record is for, by the fields it carries. A stage states the kind it trains on.
KINDS = ("text", "conversation", "preference", "unpaired_preference")


@dataclass
class Record:
    """One training example.

    Attributes:
        messages: Turns `{"role": ..., "content": ...}` without the system prompt. Alpaca user
            turns also carry the raw "instruction" and "input" for templates that need them.
        system: The system prompt, or None.
        tools: JSON text of the tool definitions, as in the source.
        chosen: Preference data: the preferred final assistant message (after `messages`).
        rejected: Preference data: the dispreferred final assistant message.
        label: Unpaired preference (KTO): whether the final reply in `messages` is desirable.
        text: A plain document for language modelling; `messages` is then empty.
        source: "dataset_name:line" (or row), for error messages.
    """

    messages: list[dict]
    system: str | None = None
    tools: str | None = None
    chosen: dict | None = None
    rejected: dict | None = None
    label: bool | None = None
    text: str | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """One of `KINDS`: text, conversation, preference or unpaired_preference."""
        if self.text is not None:
            return "text"
        if self.chosen is not None:
            return "preference"
        if self.label is not None:
            return "unpaired_preference"
        return "conversation"

    def to_messages(self) -> list[dict]:
        """The turns with the system prompt (when there is one) first, as chat templates expect."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(turn) for turn in self.messages]
