"""Tool calling: messages as chat templates take them, and replies parsed back into calls.

A template's `tool_format` names how its Jinja writes tools (the formats LLaMA-Factory's
`tool_format` names, each as its model family publishes it):

- qwen: Qwen2.5's `# Tools` system block; calls as `<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>`; results as `<tool_response>` in a user turn (templates qwen, chatml).
- llama3: Llama 3.1's JSON calls `{"name": ..., "parameters": ...}`; results in an `ipython`
  turn; definitions in the first user message (template llama3).
- mistral: Mistral v0.3's `[AVAILABLE_TOOLS]`, `[TOOL_CALLS]`, `[TOOL_RESULTS]` (template
  mistral).
- default: LLaMA-Factory's `Action: name\\nAction Input: {json}` (template default).

    messages = chat_messages(record_or_openai_messages)  # what render() passes to the Jinja
    content, calls = parse_reply(template, generated_text)  # [ToolCall(name, arguments), ...]
    call_prefix(template)  # "<tool_call>\\n": a reply starting so is a call (stream buffering)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from corral.config.fields import TOOL_FORMATS
from corral.data.templates.base import Template
from corral.data.templates.families import TEMPLATES
from corral.utils.errors import CorralError

# Roles of a record (corral.data.records) and of an OpenAI request that only a template with a
# tool format can place.
TOOL_ROLES = ("function_call", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One call the model made.

    Attributes:
        name: the function's name.
        arguments: JSON text of an object, compact (`{"city":"Paris"}`), as OpenAI sends it.
    """

    name: str
    arguments: str


def chat_messages(messages: list[dict]) -> list[dict]:
    """Messages in the shape Hugging Face chat templates read tool calls in.

    A record's `function_call` turn (JSON `{"name", "arguments"}` or a list of those) and an
    OpenAI assistant message with `tool_calls` both become `{"role": "assistant", "content",
    "tool_calls": [{"type": "function", "function": {"name", "arguments": dict}}]}`: templates
    write the arguments with `tojson`, so they must be an object, not JSON text. `tool` messages
    and all others pass unchanged (an empty `tool_calls` is dropped).

    Raises:
        CorralError: a call is not JSON, has no name, or its arguments are not an object.
    """
    converted = []
    for message in messages:
        try:
            converted.append(_chat_message(message))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorralError(
                f'a tool call must be JSON {{"name": ..., "arguments": {{...}}}} (or a list '
                f"of them): {exc}; in {message['role']} message {message.get('content')!r:.80}"
            ) from exc
    return converted


def _chat_message(message: dict) -> dict:
    """One message in template shape (ValueError and the like when a call is malformed)."""
    if message["role"] == "function_call":
        calls = [_chat_call({"function": c}) for c in _as_list(json.loads(message["content"]))]
        return {"role": "assistant", "content": "", "tool_calls": calls}
    if message["role"] != "assistant" or "tool_calls" not in message:
        return message
    calls = [_chat_call(call) for call in message["tool_calls"] or []]
    plain = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**plain, "content": plain.get("content") or "", "tool_calls": calls} if calls else plain


def chat_tools(tools: list[dict] | str | None) -> list[dict] | None:
    """Tool definitions as templates take them: OpenAI's `{"type": "function", "function":
    {...}}` (bare `{"name", "parameters"}` definitions, as glaive rows hold them, are wrapped, as
    LLaMA-Factory wraps them); None for no tools.

    Raises:
        CorralError: `tools` is JSON text that does not parse, or not a list of objects.
    """
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise CorralError(f"tools is not valid JSON ({exc}): {tools[:80]!r}") from exc
    if not tools:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise CorralError(f"tools must be a list of function definitions, got {tools!r:.80}")
    return [
        t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools
    ]


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    """Whether rendering needs a tool format: tool definitions, calls or tool results."""
    return bool(tools) or any(
        m["role"] in TOOL_ROLES or (m["role"] == "assistant" and m.get("tool_calls"))
        for m in messages
    )


def check_can_render_tools(template: Template) -> None:
    """Raise when `template` has no tool format (the error names the templates that have one)."""
    if template.tool_format is None:
        raise CorralError(
            f"the '{template.name}' chat template has no place for tools, tool calls or tool "
            f"results; set template to one that has: {_templates_by_format()}"
        )


def check_tool_format(template: Template, tool_format: str | None) -> None:
    """LLaMA-Factory's `tool_format` key: it must name the format `template` writes.

    corral's templates each write one format in their Jinja, so the key selects nothing by
    itself; a value the template does not write is an error rather than silently ignored.
    """
    if tool_format is None or tool_format == template.tool_format:
        return
    if tool_format not in TOOL_FORMATS:
        raise CorralError(
            f"tool_format '{tool_format}' is not built; use one of {', '.join(TOOL_FORMATS)} "
            f"(by template: {_templates_by_format()})"
        )
    writes = f"writes tools as '{template.tool_format}'" if template.tool_format else "has none"
    raise CorralError(
        f"tool_format '{tool_format}' does not match the '{template.name}' chat template, which "
        f"{writes}; remove tool_format or set template to one that writes it "
        f"({_templates_by_format()})"
    )


def detect_tool_format(jinja: str) -> str | None:
    """The tool format a tokenizer's own chat template writes, recognised by its markers."""
    if "<tool_call>" in jinja:
        return "qwen"
    if "[TOOL_CALLS]" in jinja:
        return "mistral"
    if "ipython" in jinja and '"parameters"' in jinja:
        return "llama3"
    return None


def parse_reply(template: Template, text: str) -> tuple[str, list[ToolCall]]:
    """A generated reply split into its text and the tool calls it makes.

    Args:
        template: the template the reply was generated with (its `tool_format` is read).
        text: the reply as generated, without the stop word.

    Returns:
        (content, calls). Without a call, or with one that does not parse (bad JSON, no name,
        arguments not an object), calls is [] and content is `text` unchanged: a model's
        malformed call reaches the user as text rather than failing the request.
    """
    parse = _PARSERS.get(template.tool_format or "")
    if parse is None:
        return text, []
    try:
        content, calls = parse(text)
    except (ValueError, TypeError, KeyError, AttributeError):  # JSONDecodeError is a ValueError
        return text, []
    return (content, calls) if calls else (text, [])


def call_prefix(template: Template, name: str | None = None) -> str:
    """The text that starts a tool call in `template`'s format.

    With `name`, the text up to where that function's arguments begin, so a server can force a
    named call by writing it at the start of the reply. A reply that starts with
    `call_prefix(template)` is a call; one that is still a prefix of it may become one.

    Raises:
        CorralError: the template has no tool format.
    """
    check_can_render_tools(template)
    start, named = _PREFIXES[template.tool_format]
    return start if name is None else named.format(name=name)


# --- Formats ---------------------------------------------------------------------------------

# (start of a call, start of a named call up to its arguments), as the templates write them
_PREFIXES = {
    "qwen": ("<tool_call>\n", '<tool_call>\n{{"name": "{name}", "arguments": '),
    "llama3": ('{"name": "', '{{"name": "{name}", "parameters": '),
    "mistral": ("[TOOL_CALLS] [", '[TOOL_CALLS] [{{"name": "{name}", "arguments": '),
    "default": ("Action: ", "Action: {name}\nAction Input: "),
}


def _qwen(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], re.DOTALL)
    calls = [_call(json.loads(body), "arguments") for body in bodies]
    return text[:start].strip(), calls


def _llama3(text: str) -> tuple[str, list[ToolCall]]:
    if not text.lstrip().startswith(("{", "[")):
        return text, []
    parsed = json.loads(text.strip())
    return "", [_call(call, "parameters") for call in _as_list(parsed)]


def _mistral(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    parsed = json.loads(text[start + len("[TOOL_CALLS]") :].strip())
    return text[:start].strip(), [_call(call, "arguments") for call in _as_list(parsed)]


_ACTION = re.compile(r"Action:\s*(.+?)\s*\nAction Input:\s*(.+?)(?=\s*\nAction:|\s*$)", re.DOTALL)


def _default(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find("Action:")
    if start < 0:
        return text, []
    calls = []
    for name, arguments in _ACTION.findall(text[start:]):
        calls.append(_call({"name": name, "arguments": json.loads(arguments)}, "arguments"))
    return text[:start].strip(), calls


_PARSERS = {"qwen": _qwen, "llama3": _llama3, "mistral": _mistral, "default": _default}


def _as_list(parsed: Any) -> list:
    return parsed if isinstance(parsed, list) else [parsed]


def _call(call: Any, arguments_key: str) -> ToolCall:
    """A parsed `{"name", arguments_key}` object as a ToolCall (ValueError when malformed)."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ValueError(f"a tool call needs a name: {call!r:.80}")
    arguments = call.get(arguments_key, call.get("arguments", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be an object: {arguments!r:.80}")
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(call["name"], compact)


def _chat_call(call: dict) -> dict:
    """An OpenAI tool call with its arguments as an object (ValueError when malformed)."""
    function = call.get("function", call)
    parsed = _call(function, "arguments")
    return {
        **{k: v for k, v in call.items() if k != "function"},
        "type": "function",
        "function": {"name": parsed.name, "arguments": json.loads(parsed.arguments)},
    }


def _templates_by_format() -> str:
    pairs = sorted((t.tool_format, t.name) for t in TEMPLATES.values() if t.tool_format)
    shown = ", ".join(f"{name} ({fmt})" for fmt, name in pairs)
    return f"{shown}, or the tokenizer's own chat template where it writes tools"
