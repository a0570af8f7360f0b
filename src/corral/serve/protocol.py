"""The OpenAI request and response shapes corral's server speaks (pydantic models).

Ranges are strict (temperature 0..2, top_p 0..1, n 1..8, max_tokens >= 1) so a bad request is a
422 naming the field, never a failure deep in generation. Unknown fields are ignored, as the
OpenAI API does for options it does not use.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

MAX_N = 8
MAX_STOP = 4


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


class ChatMessage(BaseModel):
    """A conversation turn."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
