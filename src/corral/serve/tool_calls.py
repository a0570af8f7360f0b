"""Tool calling in the API: what a request lets the model call, and replies as `tool_calls`.

The template layer knows a model's call format (`parse_reply`, `call_prefix` in
`corral.data.templates`); this module decides per request and shapes OpenAI's answer:

    plan = tool_plan(body, backend.template)   # 400 (ParamError) for an impossible tool_choice
    prompt = backend.chat_ids(messages, tools=plan.tools, prefill=plan.prefill)
    message, finish = reply_message(plan, text, finish)          # a whole reply
    stream = CallStream(plan); stream.feed(text); stream.finish()  # a streamed one

A named `tool_choice` pre-fills the reply with the call's opening up to the arguments, and
"required" with the opening alone, so the model can only go on with a call. A reply whose call
is malformed comes back as plain content: the client sees what the model wrote.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from corral.serve.protocol import ChatCompletionRequest, NamedToolChoice, ParamError
from corral.utils.errors import CorralError


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request does with tools.

    Attributes:
        template: the served template (it writes and parses calls).
        tools: the definitions written into the prompt; None shows the model none.
        parse: whether replies are read for calls.
        prefill: the text the reply starts with (already in the prompt), e.g. a forced call's
            opening; replies are parsed and returned with it.
        first_only: `parallel_tool_calls: false`: a reply keeps its first call only.
    """

    template: Any
    tools: list[dict] | None = None
    parse: bool = False
    prefill: str = ""
    first_only: bool = False


def tool_plan(body: ChatCompletionRequest, template: Any) -> ToolPlan:
    """The request's tool settings, checked against each other and the template.

    Raises:
        ParamError: tool_choice needs tools that were not given or names an unknown one;
            duplicate tool names; the template has no tool-call format.
    """
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none":
            raise ParamError(
                f"tool_choice {_shown(choice)} needs `tools`; none were given", "tool_choice"
            )
        return ToolPlan(template)
    if choice == "none":
        # the model is not shown the tools: one that sees them may answer with a call, which
        # would reach the client as text
        return ToolPlan(template)
    names = [tool.function.name for tool in body.tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ParamError(f"tools define {', '.join(repeated)} more than once", "tools")
    from corral.data.templates import call_prefix
    from corral.data.templates.tools import check_can_render_tools

    try:
        check_can_render_tools(template)
    except CorralError as exc:  # a 400 naming the field, never a reply that ignores the tools
        raise ParamError(f"`tools` cannot be served: {exc}", "tools") from exc
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ParamError(
                f"tool_choice names function '{choice.function.name}', which is not in tools "
                f"(they define: {', '.join(names)})",
                "tool_choice",
            )
        prefill = call_prefix(template, choice.function.name)
    else:
        prefill = call_prefix(template) if choice == "required" else ""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    # the model writes the whitespace itself: BPE tokenizers join a space to the word after it,
    # so a prompt ending in one ends in a token the model never saw before arguments
    return ToolPlan(template, tools, True, prefill.rstrip(), not body.parallel_tool_calls)


def _shown(choice: Any) -> str:
    if isinstance(choice, NamedToolChoice):
        return f"(function '{choice.function.name}')"
    return f"'{choice}'"


def reply_message(plan: ToolPlan, text: str, finish: str | None) -> tuple[dict, str | None]:
    """A whole reply as OpenAI's assistant message, and its finish reason.

    With calls: `tool_calls`, content the text before them (None when blank), finish
    "tool_calls". Otherwise the text (pre-fill included) as content, finish unchanged.
    """
    full = plan.prefill + text
    content, calls = _calls(plan, full) if plan.parse else (full, [])
    if not calls:
        return {"role": "assistant", "content": full}, finish
    message = {
        "role": "assistant",
        "content": content if content.strip() else None,
        "tool_calls": [_wire(call) for call in calls],
    }
    return message, "tool_calls"


def _calls(plan: ToolPlan, text: str) -> tuple[str, list]:
    from corral.data.templates import parse_reply

    content, calls = parse_reply(plan.template, text)
    return content, calls[:1] if plan.first_only else calls


def _wire(call: Any) -> dict:
    """A parsed call in OpenAI's shape, with a fresh id."""
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


class CallStream:
    """One streamed choice with tools active: text that cannot be a call passes through as
    content; from a call's opening on, the text is held until the reply ends, then sent in
    OpenAI's delta format, or as content when it is not a well-formed call (a call is never
    half sent).

    `feed` and `finish` return the `delta` objects to send, in order.
    """

    def __init__(self, plan: ToolPlan):
        from corral.data.templates import call_prefix

        self.plan = plan
        # without its trailing whitespace: a model that writes the opening with a space or
        # newline of its own still starts a call, which `parse_reply` then judges
        self.opening = call_prefix(plan.template).rstrip()
        self.held = plan.prefill
        self.in_call = self.opening in self.held

    def feed(self, text: str) -> list[dict]:
        """Take the next generated text; return the content that can be sent now."""
        self.held += text
        if self.in_call:
            return []
        start = self.held.find(self.opening)
        if start >= 0:
            self.in_call = True
            cut = start
        elif self.opening.startswith(self.held.lstrip()):
            cut = 0  # blank, or a call's opening so far: a call may still come
        else:
            cut = len(self.held) - _opening_suffix(self.held, self.opening)
        sent, self.held = self.held[:cut], self.held[cut:]
        return [{"content": sent}] if sent else []

    def finish(self) -> tuple[list[dict], bool]:
        """The deltas that end the reply, and whether it made calls."""
        content, calls = _calls(self.plan, self.held) if self.in_call else (self.held, [])
        if not calls:
            return ([{"content": self.held}] if self.held else []), False
        deltas = [{"content": content}] if content.strip() else []
        for index, call in enumerate(_wire(call) for call in calls):
            name = {**call["function"], "arguments": ""}
            deltas.append({"tool_calls": [{"index": index, **call, "function": name}]})
            arguments = {"arguments": call["function"]["arguments"]}
            deltas.append({"tool_calls": [{"index": index, "function": arguments}]})
        return deltas, True


def _opening_suffix(text: str, opening: str) -> int:
    """Length of the longest end of `text` that begins `opening` (held back: a call may follow)."""
    for size in range(min(len(opening) - 1, len(text)), 0, -1):
        if opening.startswith(text[-size:]):
            return size
    return 0
