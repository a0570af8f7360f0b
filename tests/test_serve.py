"""`corral serve`: the real server in a subprocess, driven with the official `openai` client."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the test extra: openai")
httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra: httpx")

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Hello there"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `corral serve ARGS` on a free port; return (process, base URL) once /health is ok.

    The server's output goes to a temporary file (`server_log(process)` reads it), not a pipe:
    a pipe nobody reads fills after ~64 KB of logged errors and then blocks the server.
    """
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--port", str(port), *args],
        env={**environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"corral serve exited: {server_log(process)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("corral serve did not become healthy in 120 s")


def server_log(process: subprocess.Popen) -> str:
    """Everything the server printed so far."""
    process.log.seek(0)
    return process.log.read()


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    process, url = start_server(
        "--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--max-concurrency", "8"
    )
    yield url
    stop_server(process)


@pytest.fixture(scope="session")
def keyed_server(tiny_llama_dir):
    process, url = start_server("--model", str(tiny_llama_dir), env={"CORRAL_API_KEY": KEY})
    yield url
    stop_server(process)


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)


def _chat(client, messages=HELLO, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 16, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def _stream_text(client, messages=HELLO, **kwargs) -> tuple[str, list]:
    kwargs = {"temperature": 0, "max_tokens": 16, **kwargs}
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, stream=True, **kwargs)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _prompt_len(tokenizer, messages) -> int:
    from corral.data.templates import encode_prompt, get_template

    return len(encode_prompt(get_template(None, tokenizer), tokenizer, messages))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "vllm"], "vllm"),
        (["--backend", "llamacpp", "--model", "missing.gguf"], "needs a .gguf file"),
        (["--backend", "llamacpp", "--model", "m.gguf", "--adapter", "a"], "merge them first"),
        (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    ],
)
def test_bad_serve_options_are_one_line_errors(args, message):
    environ = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "corral", "serve", *args]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stream_equals_non_stream_and_usage_counts_tokens(client, smol_tokenizer):
    whole = _chat(client, max_tokens=20)
    text, chunks = _stream_text(client, max_tokens=20, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == _prompt_len(smol_tokenizer, HELLO)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 20


def test_system_and_assistant_turns_change_the_prompt(client, smol_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    reply = _chat(client, messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == _prompt_len(smol_tokenizer, messages)


def test_completions_raw_prompt(client, smol_tokenizer):
    prompt = "The capital of France is"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0)
    assert reply.usage.prompt_tokens == len(smol_tokenizer(prompt)["input_ids"])
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 7
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=7, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_stop_sequence_cuts_the_reply(client):
    full = _chat(client, max_tokens=30).choices[0].message.content
    stop = full[10:13]
    assert stop.strip(), f"reply too short to pick a stop string from: {full!r}"
    expected = full[: full.find(stop)]
    cut = _chat(client, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert _stream_text(client, max_tokens=30, stop=stop)[0] == expected


def test_seeded_sampling_and_n_choices(client):
    first = _chat(client, temperature=1.0, seed=3, n=2, max_tokens=10)
    again = _chat(client, temperature=1.0, seed=3, n=2, max_tokens=10)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 20


def test_too_long_requests_are_400_not_500(client):
    with pytest.raises(openai.BadRequestError, match="context of 512 tokens"):
        _chat(client, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="context of 512 tokens"):
        _chat(client, messages=[{"role": "user", "content": "word " * 600}])


def test_malformed_requests_get_openai_error_json(tiny_server):
    url = f"{tiny_server}/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error"]["type"]
    wrong = httpx.post(url, json={"messages": HELLO, "temperature": 5})
    assert wrong.status_code == 422 and "temperature" in wrong.json()["error"]["message"]
    no_messages = httpx.post(url, json={"messages": []})
    assert no_messages.status_code == 422
    huge = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert huge.status_code == 413 and "error" in huge.json()


def test_api_key_required_when_set(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    missing = httpx.get(f"{keyed_server}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    anonymous = httpx.post(f"{keyed_server}/v1/chat/completions", json={"messages": HELLO})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"]
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="x", messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def _prompts(count: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(count)
    ]


def test_16_concurrent_streams_get_their_own_replies(client):
    prompts = _prompts(16)
    alone = [_chat(client, messages=m, max_tokens=24).choices[0].message.content for m in prompts]
    results: dict[int, str] = {}

    def worker(index: int) -> None:
        results[index] = _stream_text(client, messages=prompts[index], max_tokens=24)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results.get(i) for i in range(16)] == alone
    assert len(set(alone)) > 1, "different prompts should give different replies"


def test_client_disconnect_mid_stream_frees_its_slot(tiny_server):
    before = httpx.get(f"{tiny_server}/health").json()["abandoned"]
    body = {"messages": HELLO, "max_tokens": 480, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    assert _health_after_abandon(tiny_server, before) == (before + 1, 0)


def test_client_disconnect_before_a_whole_reply_cancels_it(tiny_server):
    """A non-streaming client that gives up (here: a 0.5 s timeout on a ~480-token reply)
    frees its row within a few seconds instead of the server generating on for nobody."""
    before = httpx.get(f"{tiny_server}/health").json()["abandoned"]
    body = {"messages": HELLO, "max_tokens": 480, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=0.5)
    assert _health_after_abandon(tiny_server, before) == (before + 1, 0)


def _health_after_abandon(url: str, before: int, seconds: float = 10) -> tuple[int, int]:
    """(abandoned, running) from /health once a reply was abandoned and nothing runs, or
    when `seconds` are up."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"{url}/health").json()
        done = health["abandoned"] > before and health["running"] == 0
        if done or time.monotonic() > deadline:
            return health["abandoned"], health["running"]
        time.sleep(0.05)


def _timed_requests(client, count: int) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []

    def worker(messages) -> None:
        start = time.monotonic()
        _chat(client, messages=messages, max_tokens=64)
        spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(m,)) for m in _prompts(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return spans


def test_concurrent_requests_overlap_in_time(client):
    one = _timed_requests(client, 1)
    eight = _timed_requests(client, 8)
    tokens_per_s_1 = 64 / (one[0][1] - one[0][0])
    tokens_per_s_8 = 8 * 64 / (max(e for _, e in eight) - min(s for s, _ in eight))
    print(f"\nthroughput: {tokens_per_s_1:.0f} tok/s at 1, {tokens_per_s_8:.0f} tok/s at 8")
    assert max(s for s, _ in eight) < min(e for _, e in eight), "requests ran one after another"


def test_sigterm_mid_stream_exits_cleanly(tiny_llama_dir):
    process, url = start_server("--model", str(tiny_llama_dir))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="x", messages=HELLO, max_tokens=450, stream=True, temperature=1.0
    )
    next(iter(stream))
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(Exception):
        for _ in stream:
            pass
    code = process.wait(timeout=15)
    assert code == 0, server_log(process)
    print(f"\nexited {time.monotonic() - started:.1f} s after SIGTERM")


@pytest.mark.slow
def test_default_model_reply_equals_chat_engine(default_model_dir):
    from corral.config.fields import ModelConfig
    from corral.infer.engine import ChatEngine

    question = [{"role": "user", "content": "What is the capital of France?"}]
    engine = ChatEngine(ModelConfig())
    expected = engine.chat(question, temperature=0, max_new_tokens=40)
    process, url = start_server("--served-model-name", "smol")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="smol", messages=question, temperature=0, max_tokens=40
        )
        text, _ = _stream_text(client, messages=question, max_tokens=40)
    finally:
        assert stop_server(process) == 0
    assert reply.choices[0].message.content == text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens


def test_a_cancel_that_arrives_with_a_token_still_cancels_the_reply():
    """The server cancels a gone client's reply by cancelling the task that reads its deltas.
    When that cancel lands in the same loop turn as a token (tokens come every few ms),
    the reply must still stop: Python 3.11's `asyncio.wait_for` returned the token and
    dropped the cancel, so the reply ran on for nobody (a flaky test_client_disconnect...)."""
    import asyncio
    from types import SimpleNamespace

    from corral.infer.batching import Delta, Handle, SamplingParams
    from corral.serve.app import _deltas

    async def scenario() -> tuple[bool, int, int]:
        app = SimpleNamespace(state=SimpleNamespace(request_timeout=60.0, abandoned=0))
        handle, inbox = (
            Handle([1], SamplingParams(max_tokens=2), lambda delta: None),
            asyncio.Queue(),
        )
        received: list = []

        async def consume() -> None:
            async for item in _deltas(app, [handle], inbox):
                received.append(item)

        task = asyncio.ensure_future(consume())
        for _ in range(3):
            await asyncio.sleep(0)  # the reader now waits for a token
        inbox.put_nowait((0, Delta("a")))
        await asyncio.sleep(0)  # the token is handed over to the reader...
        task.cancel()  # ...and the client's cancel comes in the same turn
        inbox.put_nowait((0, Delta("b", "length", 2)))  # the reply would finish next
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled(), len(received), app.state.abandoned

    cancelled, tokens_read, abandoned = asyncio.run(scenario())
    assert cancelled and abandoned == 1
    assert tokens_read < 2
