"""Turn rows of each source format into `Record`s.

Formats, with LLaMA-Factory's column and tag defaults:

- alpaca: instruction / input / output (+ history, system, tools; chosen / rejected for
  preference pairs; a boolean kto_tag column for KTO).
- sharegpt: a list of turns in "conversations" with from/value tags (human, gpt,
  function_call, observation, system); rows whose turns use OpenAI's role/content keys are
  recognised on their own. "openai" is sharegpt with OpenAI's defaults.
- text: one document per row in the "text" column (or the column `columns.prompt` names).

A row that cannot make a usable example (no reply, roles out of order, unknown role) raises
`Dropped`; the loader counts it with its reason. A column that is missing altogether is a
`DataError`: that is a wrong mapping, not a bad row.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.data.records import Record
from corral.utils.errors import DataError
from corral.utils.suggest import did_you_mean

if TYPE_CHECKING:
    from corral.data.registry import DatasetSpec

FORMATTINGS = ("alpaca", "sharegpt", "openai", "text")

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
_ROLE_OF_TAG = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Turns alternate: a user (or tool result) turn, then an assistant (or tool call) turn.
_PROMPT_SIDE = ("user", "tool")
_REPLY_SIDE = ("assistant", "function_call")


class Dropped(Exception):
    """A row that cannot become a usable example; the reason reads "12 <reason>"."""


def converter_for(spec: DatasetSpec) -> Converter:
    """The converter for a dataset's formatting."""
    if spec.formatting == "alpaca":
        return AlpacaConverter(spec)
    if spec.formatting in ("sharegpt", "openai"):
        return ShareGPTConverter(spec)
    return TextConverter(spec)


def guess_format(path: Path, first_row: dict) -> tuple[str, dict[str, str], bool]:
    """Guess (formatting, columns, ranking) for a file given directly by path.

    Raises:
        DataError: a first row whose fields match no known format.
    """
    if path.suffix.lower() == ".txt":
        return "text", {}, False
    keys = set(first_row)
    ranking = {"chosen", "rejected"} <= keys
    optional = ("system", "tools", "chosen", "rejected")
    if keys & {"conversations", "messages"}:
        columns = {"messages": "conversations" if "conversations" in keys else "messages"}
        columns |= {key: key for key in optional if key in keys}
        return "sharegpt", columns | ({"kto_tag": "label"} if "label" in keys else {}), ranking
    if "instruction" in keys and ("output" in keys or ranking):
        columns = {key: key for key in (*optional, "history") if key in keys}
        return "alpaca", columns | ({"kto_tag": "label"} if "label" in keys else {}), ranking
    if "text" in keys:
        return "text", {}, False
    raise DataError(
        f"{path}: cannot tell the format from the first row (fields: {', '.join(keys) or 'none'});"
        " corral recognises instruction/output (alpaca), conversations or messages "
        "(sharegpt/OpenAI) and text (documents). Otherwise register the file in "
        'dataset_info.json with "formatting" and "columns"'
    )


class Converter:
    """Base: required columns are checked against each file's first row, then rows convert."""

    def __init__(self, spec: DatasetSpec, columns: dict[str, str]):
        self.spec = spec
        self.columns = columns  # role -> column name, defaults filled in

    def required(self) -> list[str]:
        """Column roles (keys of `self.columns`) every row must have."""
        return []

    def check_columns(self, row: dict, where: str) -> None:
        """Raise a DataError naming a required or explicitly mapped column missing from `row`."""
        wanted = dict.fromkeys([*self.required(), *self.spec.columns])
        for key in wanted:
            column = self.columns.get(key)
            if column is not None and column not in row:
                raise self._missing(key, column, row, where)

    def __call__(self, row: dict, source: str) -> Record:
        raise NotImplementedError

    def _get(self, row: dict, key: str) -> Any:
        """The row's value for a column role, None when the role has no column."""
        column = self.columns.get(key)
        return None if column is None else row.get(column)

    def _missing(self, key: str, column: str, row: dict, where: str) -> DataError:
        present = ", ".join(map(str, row)) or "none"
        if key in self.spec.columns:
            fix = f'"columns": {{"{key}": "{column}"}} comes from {self.spec.origin}; fix the name'
        else:
            fix = (
                f"{self.spec.formatting} reads the {key} from '{column}' by default; if it is "
                f'in another column, add "columns": {{"{key}": "<column>"}} to the dataset entry'
            )
        return DataError(
            f"dataset '{self.spec.name}' ({where}): column '{column}' not found"
            f"{did_you_mean(column, map(str, row))}; columns present: {present}. {fix}"
        )


class AlpacaConverter(Converter):
    """instruction (+ input) -> user turn, output -> assistant turn, history -> earlier turns."""

    def __init__(self, spec: DatasetSpec):
        super().__init__(spec, {**ALPACA_COLUMNS, **spec.columns})

    def required(self) -> list[str]:
        keys = ["prompt", "chosen", "rejected"] if self.spec.ranking else ["prompt", "response"]
        return keys + (["kto_tag"] if "kto_tag" in self.columns else [])

    def __call__(self, row: dict, source: str) -> Record:
        def get(key: str) -> Any:
            return self._get(row, key)

        messages = _history(get("history"))
        instruction, query = (
            _text(get("prompt"), "instruction") or "",
            _text(get("query"), "input") or "",
        )
        content = "\n".join(part for part in (instruction, query) if part)
        if not content.strip():
            raise Dropped("had an empty instruction and input")
        messages.append(
            {"role": "user", "content": content, "instruction": instruction, "input": query}
        )
        record = Record(
            messages,
            system=_text(get("system"), "system prompt") or None,
            tools=_tools(get("tools")),
            source=source,
        )
        if self.spec.ranking:
            record.chosen = _reply(
                {"role": "assistant", "content": _text(get("chosen"), "chosen reply")}
            )
            record.rejected = _reply(
                {"role": "assistant", "content": _text(get("rejected"), "rejected reply")}
            )
            return record
        messages.append(_reply({"role": "assistant", "content": _text(get("response"), "reply")}))
        if "kto_tag" in self.columns:
            record.label = _label(get("kto_tag"))
        return record


class ShareGPTConverter(Converter):
    """A list of turns -> messages; a leading system turn -> system; chosen/rejected objects."""

    def __init__(self, spec: DatasetSpec):
        openai = spec.formatting == "openai"
        default_messages = "messages" if openai else "conversations"
        super().__init__(spec, {"messages": default_messages, **spec.columns})
        self.tags = {**(OPENAI_TAGS if openai else SHAREGPT_TAGS), **spec.tags}
        # OpenAI's legacy "function" role carries a function's result, like "tool".
        openai_roles = {**_role_table(OPENAI_TAGS), "function": "tool"}
        self.roles = openai_roles if openai and not spec.tags else _role_table(self.tags)
        # Without explicit tags, rows whose turns carry role/content are read as OpenAI-style.
        self.openai_roles = None if spec.tags or openai else openai_roles

    def required(self) -> list[str]:
        keys = ["messages", "chosen", "rejected"] if self.spec.ranking else ["messages"]
        return keys + (["kto_tag"] if "kto_tag" in self.columns else [])

    def check_columns(self, row: dict, where: str) -> None:
        # A dataset may name its turns "messages" rather than the default "conversations".
        if (
            "messages" not in self.spec.columns
            and self.columns["messages"] not in row
            and "messages" in row
        ):
            self.columns["messages"] = "messages"
        super().check_columns(row, where)

    def __call__(self, row: dict, source: str) -> Record:
        turns = self._get(row, "messages")
        if not isinstance(turns, list) or not turns:
            raise Dropped(
                "had an empty conversation" if not turns else "had turns that are not a list"
            )
        role_tag, content_tag, roles = self._tags_of(turns[0])
        messages = [_turn(turn, role_tag, content_tag, roles) for turn in turns]
        system = None
        if messages[0]["role"] == "system":
            system = messages.pop(0)["content"] or None
        else:
            system = _text(self._get(row, "system"), "system prompt") or None
        record = Record(
            messages, system=system, tools=_tools(self._get(row, "tools")), source=source
        )
        _check_order(messages, ends_with_reply=not self.spec.ranking)
        if self.spec.ranking:
            record.chosen = _reply(
                _preference_turn(self._get(row, "chosen"), role_tag, content_tag, roles)
            )
            record.rejected = _reply(
                _preference_turn(self._get(row, "rejected"), role_tag, content_tag, roles)
            )
        else:
            _reply(messages[-1])
        if "kto_tag" in self.columns:
            record.label = _label(self._get(row, "kto_tag"))
        return record

    def _tags_of(self, first_turn: object) -> tuple[str, str, dict[str, str]]:
        role_tag = self.tags["role_tag"]
        if (
            self.openai_roles
            and isinstance(first_turn, dict)
            and role_tag not in first_turn
            and "role" in first_turn
        ):
            return "role", "content", self.openai_roles
        return role_tag, self.tags["content_tag"], self.roles


class TextConverter(Converter):
    """One document per row, from the "text" column (or the one `columns.prompt` names)."""

    def __init__(self, spec: DatasetSpec):
        super().__init__(spec, {"prompt": spec.columns.get("prompt", "text")})

    def required(self) -> list[str]:
        return ["prompt"]

    def __call__(self, row: dict, source: str) -> Record:
        text = _text(self._get(row, "prompt"), "text")
        if not text or not text.strip():
            raise Dropped("had an empty text")
        return Record(messages=[], text=text, source=source)


def _role_table(tags: dict[str, str]) -> dict[str, str]:
    return {tags[tag]: role for tag, role in _ROLE_OF_TAG.items()}


def _text(value: Any, what: str) -> str | None:
    """A cell as text: strings as they are, numbers written out, None for missing."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise Dropped(f"had a {what} that is not text ({type(value).__name__})")


def _tools(value: Any) -> str | None:
    if value is None or value == "" or value == []:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value in (0, 1):
        return bool(value)
    raise Dropped(f"had a label that is not true/false ({value!r:.30})")


def _reply(turn: dict) -> dict:
    """Check that a final assistant turn has something to learn from."""
    if turn["content"] is None or not turn["content"].strip():
        raise Dropped("had no assistant reply")
    return turn


def _history(value: Any) -> list[dict]:
    if value is None or value == "":
        return []
    pairs = value if isinstance(value, list) else None
    if pairs is None or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise Dropped("had a history that is not a list of [question, answer] pairs")
    messages = []
    for question, answer in pairs:
        messages.append({"role": "user", "content": _text(question, "history question") or ""})
        messages.append({"role": "assistant", "content": _text(answer, "history answer") or ""})
    return messages


def _turn(turn: Any, role_tag: str, content_tag: str, roles: dict[str, str]) -> dict:
    if not isinstance(turn, dict):
        raise Dropped("had a turn that is not an object")
    tag = turn.get(role_tag)
    if tag not in roles:
        shown = "no role" if tag is None else f"unknown role '{str(tag):.30}'"
        raise Dropped(f'had {shown} (tags expect {", ".join(roles)}; set "tags" in the entry)')
    if turn.get("tool_calls") and roles[tag] == "assistant":
        if turn.get(content_tag):
            raise Dropped("had an assistant turn with both text and tool calls")
        return {"role": "function_call", "content": _tool_calls(turn["tool_calls"])}
    content = _text(turn.get(content_tag), "turn content")
    if content is None:
        raise Dropped(f"had a turn without '{content_tag}'")
    return {"role": roles[tag], "content": content}


def _tool_calls(calls: Any) -> str:
    """OpenAI tool_calls as corral's function_call content: {"name", "arguments"} (or a list)."""
    converted = []
    for call in calls if isinstance(calls, list) else [calls]:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):  # kept as text when not JSON
                arguments = json.loads(arguments)
        if "name" not in function:
            raise Dropped("had a tool call without a function name")
        converted.append({"name": function["name"], "arguments": arguments})
    return json.dumps(converted[0] if len(converted) == 1 else converted, ensure_ascii=False)


def _preference_turn(value: Any, role_tag: str, content_tag: str, roles: dict[str, str]) -> dict:
    if value is None:
        raise Dropped("had no chosen/rejected reply")
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    turn = _turn(value, role_tag, content_tag, roles)
    if turn["role"] not in _REPLY_SIDE:
        raise Dropped(f"had a chosen/rejected reply from '{turn['role']}', not the assistant")
    return turn


def _check_order(messages: list[dict], *, ends_with_reply: bool) -> None:
    if not messages:
        raise Dropped("had an empty conversation")
    for i, turn in enumerate(messages):
        expected = _PROMPT_SIDE if i % 2 == 0 else _REPLY_SIDE
        if turn["role"] not in expected:
            side = "a user or tool" if i % 2 == 0 else "an assistant"
            raise Dropped(f"had roles out of order ('{turn['role']}' where {side} turn belongs)")
    if ends_with_reply and len(messages) % 2:
        raise Dropped("had no assistant reply")
    if not ends_with_reply and not len(messages) % 2:
        raise Dropped("had a conversation ending in a reply before chosen/rejected")
