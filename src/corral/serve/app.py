"""The FastAPI application: OpenAI's routes over one `Backend`.

    app = create_app(backend, served_model_name="corral", api_key="secret")
    uvicorn.run(app)   # what `corral serve` does, bound to 127.0.0.1 by default

Every error is OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 401 for a
missing or wrong key, 422 for malformed JSON or wrong types, 400 for a prompt that does not fit
the model's context or tools the request or template cannot use (see `tool_calls`), 413 for an
oversized body, 429 (with Retry-After) when `max_queue` requests are already in flight, 504
for a request that runs past `request_timeout` (a stream then ends with an error event, as
OpenAI's do). A client that disconnects (mid-stream, or while waiting for a whole reply)
cancels its request, which frees its place in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.infer.batching import Delta, SamplingParams
from corral.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ParamError,
    new_id,
)
from corral.serve.tool_calls import CallStream, ToolPlan, reply_message, tool_plan
from corral.utils.errors import CorralError

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks its client is still there
RETRY_AFTER_S = 1  # what a 429 asks the client to wait: a short reply frees a row in ~1 s
ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    429: {"model": ErrorResponse},
    504: {"model": ErrorResponse},
}


class RequestTimedOut(Exception):
    """A request ran past the server's request timeout."""

    def __init__(self, seconds: float):
        super().__init__(
            f"the request took longer than the server's --request-timeout of {seconds:g} s; "
            "ask for fewer max_tokens or retry when the server is less busy"
        )


def create_app(
    backend: Any,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int | None = None,
    request_timeout: float | None = None,
    kb: Any = None,
) -> FastAPI:
    """The API app serving `backend` under the name `served_model_name`.

    Args:
        backend: a `corral.serve.backends.Backend`.
        served_model_name: the id `/v1/models` lists and responses carry.
        api_key: when set, every /v1 route requires `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies get 413.
        max_queue: when this many requests (choices) are waiting or generating, new ones get
            429 with Retry-After; None: no limit.
        request_timeout: seconds a request may take, waiting included; None: no limit.
        kb: a `corral.serve.knowledge.ServedKb`: chat completions then answer from it and carry
            its passages in an extra `sources` field.
    """
    from corral import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        backend.close()  # shutdown (e.g. SIGTERM): cancel whatever is still waiting
        if kb is not None:
            kb.close()

    app = FastAPI(
        title="corral", version=__version__, description="OpenAI-compatible API", lifespan=lifespan
    )
    app.state.backend = backend
    app.state.model_name = served_model_name
    app.state.abandoned = 0
    app.state.max_queue, app.state.request_timeout = max_queue, request_timeout
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    auth = [Depends(_key_checker(api_key))] if api_key else []

    @app.get("/health")
    async def health() -> dict:
        """Liveness, plus requests in progress and replies abandoned by their client."""
        return {"status": "ok", "running": backend.load(), "abandoned": app.state.abandoned}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name)])

    @app.post("/v1/chat/completions", responses=ERRORS, dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        plan = tool_plan(body, backend.template)
        messages = [m.for_template() for m in body.messages]
        extra, answer = {}, None
        if kb is not None:
            messages, sources, answer = await kb.ground(messages)
            extra = {"sources": sources}
        if answer is not None:  # nothing relevant: kb_no_answer, and the model is not asked
            return await _respond(request, body, [], None, plan, extra, answer)
        prompt = _user_error(backend.chat_ids, messages, plan.tools, plan.prefill)
        limit = body.max_completion_tokens or body.max_tokens
        return await _respond(request, body, prompt, limit, plan, extra)

    @app.post("/v1/completions", responses=ERRORS, dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            prompt = _user_error(backend.text_ids, body.prompt)
        else:
            prompt = _check_ids(body.prompt, len(backend.tokenizer))
        return await _respond(request, body, prompt, body.max_tokens, None)

    return app


def _key_checker(api_key: str):
    """A dependency: 401 unless the request carries `Authorization: Bearer <api_key>`."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    return check


def _user_error(function, *args):
    try:
        return function(*args)
    except CorralError as exc:
        raise HTTPException(400, str(exc)) from exc


def _check_ids(ids: list[int], vocab: int) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise HTTPException(400, f"prompt token ids must be in 0..{vocab - 1}; got {bad[0]}")
    return ids


def _sampling(body: Any, prompt: list[int], limit: int | None, backend: Any) -> list:
    """One SamplingParams per choice, after checking the prompt and budget fit the context."""
    context = backend.context_len
    if not prompt:
        raise HTTPException(400, "the prompt is empty")
    if context and len(prompt) >= context:
        raise HTTPException(
            400,
            f"the prompt is {len(prompt)} tokens: it must be shorter than the model's context "
            f"of {context} tokens; shorten the conversation",
        )
    max_tokens = limit or (context - len(prompt) if context else 512)
    if context and len(prompt) + max_tokens > context:
        raise HTTPException(
            400,
            f"the prompt is {len(prompt)} tokens and max_tokens is {max_tokens}: more than the "
            f"model's context of {context} tokens; lower max_tokens to at most "
            f"{context - len(prompt)}",
        )
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=None if body.seed is None else body.seed + index,
            stop=body.stop_list(),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )
        for index in range(body.n)
    ]


def _admit(app: FastAPI, prompt: list[int], params: list) -> AsyncIterator[tuple]:
    """Submit the request's choices now (429 when the queue is full) and return their deltas.

    Checking the load and submitting happen with no await between them, so concurrent
    requests cannot all slip past the check together."""
    backend, limit = app.state.backend, app.state.max_queue
    if limit is not None and backend.load() >= limit:
        raise HTTPException(
            429,
            f"the server is busy: {limit} requests are in flight (--max-queue); retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def sink(index: int, item: Any) -> None:
        # RuntimeError: the event loop is gone (shutdown), so nobody is listening
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(inbox.put_nowait, (index, item))

    handles = [backend.submit(prompt, p, functools.partial(sink, i)) for i, p in enumerate(params)]
    return _deltas(app, handles, inbox)


async def _deltas(app: FastAPI, handles: list, inbox: asyncio.Queue) -> AsyncIterator[tuple]:
    """(choice index, Delta) as the backend produces them; closing it early (the client went
    away, or shutdown) or the request timeout cancels the unfinished requests, which frees
    their rows in the batch."""
    timeout = app.state.request_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    remaining = len(handles)
    try:
        while remaining:
            left = None if deadline is None else deadline - time.monotonic()
            # not asyncio.wait_for: on Python 3.11 it returns the item and drops a cancel that
            # arrives as the item does, so with tokens every few ms a gone client's reply ran on
            try:
                async with asyncio.timeout(left):
                    index, item = await inbox.get()
            except TimeoutError:
                raise RequestTimedOut(timeout) from None
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield index, item
    finally:
        for handle in handles:
            handle.cancel()
        app.state.abandoned += any(not handle.finished for handle in handles)


async def _respond(
    request: Request,
    body: Any,
    prompt: list[int],
    limit: int | None,
    plan: ToolPlan | None,
    extra: dict | None = None,
    answer: str | None = None,
):
    """Generate and answer; `plan` is the chat request's tool plan, None for a completion.
    `extra` fields go on the response object (streaming: on each choice's last chunk);
    `answer`, when set, is every choice's whole reply, given without generating."""
    app = request.app
    chat = plan is not None
    extra = extra or {}
    meta = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": app.state.model_name,
    }
    if answer is None:
        deltas = _admit(app, prompt, _sampling(body, prompt, limit, app.state.backend))
    else:
        deltas = _fixed(answer, body.n)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(deltas, meta, len(prompt), plan, usage, extra)
        return StreamingResponse(events, media_type="text/event-stream")
    collected = await _unless_disconnected(request, _collect(deltas, body.n))
    if collected is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    texts, finish, used = collected
    choices = [_choice(i, texts[i], finish[i], plan) for i in range(body.n)]
    return {**meta, "choices": choices, "usage": _usage(len(prompt), sum(used)), **extra}


async def _fixed(text: str, n: int) -> AsyncIterator[tuple]:
    """(choice index, Delta) for `n` choices that are all `text`, generated by no model."""
    for index in range(n):
        yield index, Delta(text, finish_reason="stop")


async def _collect(deltas: AsyncIterator, n: int) -> tuple[list[str], list, list[int]]:
    """Each choice's whole text, finish reason and completion tokens."""
    texts, finish, used = [""] * n, [None] * n, [0] * n
    async for index, delta in deltas:
        texts[index] += delta.text
        finish[index], used[index] = delta.finish_reason, delta.completion_tokens
    return texts, finish, used


async def _unless_disconnected(request: Request, work: Awaitable) -> Any | None:
    """`work`'s result, or None when the client goes away first: `work` is then cancelled,
    which (through `_deltas`) cancels its requests and frees their rows in the batch."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


def _choice(index: int, text: str, finish: str | None, plan: ToolPlan | None) -> dict:
    if plan is not None:
        message, finish = reply_message(plan, text, finish)
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _sse(
    deltas: AsyncIterator,
    meta: dict,
    prompt_tokens: int,
    plan: ToolPlan | None,
    include_usage: bool,
    ending: dict | None = None,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; the `ending`
    fields go on the chunk that finishes each choice."""
    chat = plan is not None
    meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    calls: dict[int, CallStream] = {}
    started: set[int] = set()
    used = 0
    try:
        async for index, delta in _ending_in_error_event(deltas):
            if isinstance(delta, dict):  # the stream failed after it started: say so, and end
                yield f"data: {json.dumps(delta)}\n\n"
                return
            if not chat:
                choices = [
                    {"index": index, "text": delta.text, "finish_reason": delta.finish_reason}
                ]
            else:
                if plan.parse and index not in calls:
                    calls[index] = CallStream(plan)
                choices = _chat_chunks(index, delta, calls.get(index), first=index not in started)
            started.update(choice["index"] for choice in choices)
            used += delta.completion_tokens if delta.finish_reason else 0
            for choice in choices:
                last = ending if ending and choice["finish_reason"] is not None else {}
                yield f"data: {json.dumps({**meta, 'choices': [choice], **extra, **last})}\n\n"
        if include_usage:
            final = {**meta, "choices": [], "usage": _usage(prompt_tokens, used)}
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await deltas.aclose()


async def _ending_in_error_event(deltas: AsyncIterator) -> AsyncIterator[tuple]:
    """`deltas`, then (None, OpenAI's error object) if they fail: once a stream has begun its
    status is sent, so a timeout or a generation error can only be an event (OpenAI's clients
    raise it as an APIError)."""
    try:
        async for item in deltas:
            yield item
    except RequestTimedOut as exc:
        yield None, _error_body(504, str(exc), "timeout_error")
    except Exception as exc:  # noqa: BLE001 - one failed generation is reported, not a crash
        yield None, _error_body(500, f"internal error: {type(exc).__name__}", "server_error")


def _chat_chunks(index: int, delta: Delta, calls: CallStream | None, first: bool) -> list[dict]:
    """The chunk choices one Delta gives: the Delta itself or, with tools active, what `calls`
    lets out so far (the end then in a chunk of its own, as OpenAI sends it)."""
    if calls is None:
        pieces, finish = [{"content": delta.text}], delta.finish_reason
    else:
        pieces, finish = calls.feed(delta.text), None
        if delta.finish_reason is not None:
            ending, called = calls.finish()
            pieces += [*ending, {}]
            finish = "tool_calls" if called else delta.finish_reason
    choices = [{"index": index, "delta": piece, "finish_reason": None} for piece in pieces]
    if choices:
        choices[-1]["finish_reason"] = finish
        if first:
            choices[0]["delta"] = {"role": "assistant", **choices[0]["delta"]}
    return choices


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}


def _error(
    status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
    return JSONResponse(
        _error_body(status, message, kind, param), status_code=status, headers=headers
    )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    kinds = {
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = kinds.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    @app.exception_handler(RequestTimedOut)
    async def timed_out(request: Request, exc: RequestTimedOut) -> JSONResponse:
        return _error(504, str(exc), "timeout_error")

    @app.exception_handler(ParamError)
    async def param_error(request: Request, exc: ParamError) -> JSONResponse:
        return _error(400, exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in problems[:5]
        )
        return _error(422, message or "invalid request", "invalid_request_error", where)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes` (declared or streamed)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"request body over {self.max_bytes} bytes (or a bad Content-Length)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "413",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
