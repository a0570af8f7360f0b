"""The OpenAI request and response shapes corral's server speaks (pydantic models).

Ranges are strict (temperature 0..2, top_p 0..1, n 1..8, max_tokens >= 1) so a bad request is a
422 naming the field, never a failure deep in generation. Unknown fields are ignored, as the
OpenAI API does for options it does not use. Tool definitions, tool calls in the history and
tool results follow OpenAI's shapes (`tools`, `tool_choice`, `message.tool_calls`, `role: tool`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

MAX_N = 8
MAX_STOP = 4
MAX_TOOLS = 128  # OpenAI's limit on `tools`
# OpenAI's rule for function names: what a template can write and a parser read back
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a final chunk with the usage."""

    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stop: (
        str
        | Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_STOP)]
        | None
    ) = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> tuple[str, ...]:
        """`stop` as a tuple of non-empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class TextPart(BaseModel):
    """One part of a message's content given as a list (only text is supported)."""

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """The function a tool call invokes; `arguments` is the JSON text of an object."""

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str


class ToolCall(BaseModel):
    """One call in an assistant message's `tool_calls`."""

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    """A conversation turn: system, user, assistant (text and/or tool calls) or a tool result."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not '{self.role}' ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string ("" for an assistant message with only tool calls)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The turn as the template layer renders it (OpenAI's shape, content as one string)."""
        turn: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


class FunctionDefinition(BaseModel):
    """A function the model may call; `parameters` is the JSON Schema of its arguments."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        # arguments are a JSON object, so their schema must describe one
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError(
                f"must be a JSON Schema of type 'object' (the arguments are an object); "
                f"got type {schema.get('type')!r}"
            )
        return schema


class Tool(BaseModel):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """`tool_choice.function`: the function the reply must call."""

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class CompletionRequest(_Request):
    """`POST /v1/completions` (a raw prompt, no chat template)."""

    prompt: str | list[int] = Field(min_length=1)


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server returns: `{"error": {...}}`."""

    error: ErrorBody


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "corral"


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    """An id like OpenAI's ("chatcmpl-…", "cmpl-…")."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ParamError(Exception):
    """A request that is well-formed but cannot be served as asked: a 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param
