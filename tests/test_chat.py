"""The chat engine and `corral chat`: stopping, streaming, determinism, the interactive session."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from corral.config.fields import GenerationConfig, ModelConfig
from corral.data.templates import get_template, stop_token_ids, template_names
from corral.infer.engine import ChatEngine

HELLO = [{"role": "user", "content": "Hello there"}]


def _rigged_engine(tiny_llama, template: str, favourite: int) -> ChatEngine:
    """A tiny model whose every next token is `favourite` (a bias on the LM head)."""
    model, tokenizer = tiny_llama
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[favourite] = 10.0
    model.lm_head = head
    return ChatEngine(
        ModelConfig(template=template),
        GenerationConfig(temperature=0.0),
        model=model,
        tokenizer=tokenizer,
    )


@pytest.mark.parametrize("template", [None, *template_names()])
def test_generation_stops_on_the_templates_stop_token(tiny_llama, template):
    _, tokenizer = tiny_llama
    stops = stop_token_ids(get_template(template, tokenizer), tokenizer)
    engine = _rigged_engine(tiny_llama, template, favourite=stops[0])
    reply = engine.chat(HELLO, max_new_tokens=20)
    assert reply.finish_reason == "stop"
    assert reply.completion_tokens == 1
    assert reply.text == ""


def test_max_new_tokens_gives_finish_reason_length(tiny_llama):
    a_word = tiny_llama[1].convert_tokens_to_ids("Ġthe")  # " the" in byte-level BPE
    engine = _rigged_engine(tiny_llama, "chatml", favourite=a_word)
    reply = engine.chat(HELLO, max_new_tokens=7)
    assert reply.finish_reason == "length"
    assert reply.completion_tokens == 7
    assert reply.text.split() == ["the"] * 7


def test_stream_equals_whole_reply_and_prompt_matches_template(tiny_llama):
    model, tokenizer = tiny_llama
    engine = ChatEngine(
        ModelConfig(template="chatml"),
        GenerationConfig(temperature=0.0),
        model=model,
        tokenizer=tokenizer,
    )
    streamed = "".join(engine.stream(HELLO, max_new_tokens=12))
    reply = engine.chat(HELLO, max_new_tokens=12)
    assert streamed == reply.text
    assert reply.prompt_tokens == len(
        tokenizer("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    )


def test_batched_generation_matches_one_by_one(tiny_llama):
    model, tokenizer = tiny_llama
    engine = ChatEngine(
        ModelConfig(template="chatml"),
        GenerationConfig(temperature=0.0),
        model=model,
        tokenizer=tokenizer,
    )
    conversations = [
        HELLO,
        [{"role": "user", "content": "A much longer question about the weather today?"}],
    ]
    batched = engine.generate_batch(conversations, max_new_tokens=6)
    single = [engine.chat(c, max_new_tokens=6) for c in conversations]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]


def test_too_long_conversation_is_a_clear_error(tiny_llama):
    from corral.utils.errors import CorralError

    model, tokenizer = tiny_llama
    engine = ChatEngine(
        ModelConfig(template="chatml"), GenerationConfig(), model=model, tokenizer=tokenizer
    )
    with pytest.raises(CorralError, match="more than the model's context"):
        engine.chat([{"role": "user", "content": "word " * 600}], max_new_tokens=10)


def _corral(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_chat_prompt_with_default_model_is_deterministic(default_model_dir):
    args = (
        "chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    )
    first, second = _corral(*args), _corral(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    assert first.stdout == second.stdout
    assert "Paris" in first.stdout
    assert "[corral]" not in first.stdout  # logs go to stderr


def _read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_interactive_chat_through_a_pty(tiny_llama_dir):
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes `corral chat` on a terminal
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "corral",
                "chat",
                "--model",
                str(tiny_llama_dir),
                "--template",
                "chatml",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
            ],
        )
    _read_until(fd, b"User: ")
    os.write(fd, b"hello\n")
    assert b"Assistant: " in _read_until(fd, b"User: ")
    os.write(fd, b"/clear\n")
    assert b"(history cleared)" in _read_until(fd, b"User: ")
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_keeps_the_session(default_model_dir):
    pid, fd = pty.fork()
    if pid == 0:  # the default model replies slowly enough to be interrupted mid-reply
        command = ["chat", "--temperature", "0", "--max-new-tokens", "400"]
        os.execv(sys.executable, [sys.executable, "-m", "corral", *command])
    _read_until(fd, b"User: ")
    os.write(fd, b"Write a very long story about a dragon who learns to cook.\n")
    _read_until(fd, b"Assistant: ")
    time.sleep(1.0)  # a few words in
    os.write(fd, b"\x03")  # Ctrl-C on the terminal: SIGINT to corral chat
    assert b"[stopped]" in _read_until(fd, b"User: ")
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_prompt_with_tools_shows_the_call(tool_llama_dir, tmp_path):
    from tool_helpers import QUESTION, TEMPLATE, TOOLS

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    args = ("chat", "--model", str(tool_llama_dir), "--tools", str(tools), "--temperature", "0")
    args += ("--max-new-tokens", "48")
    done = _corral(*args, "--template", TEMPLATE, "--prompt", QUESTION["content"])
    assert done.returncode == 0, done.stderr
    assert '→ get_weather({"city":"Paris"})' in done.stdout.splitlines()
    refused = _corral(*args, "--template", "llama2", "--prompt", QUESTION["content"])
    assert refused.returncode == 1
    assert "'llama2' chat template has no place for tools" in refused.stderr


def test_interactive_tool_call_answered_with_slash_tool(tool_llama_dir, tmp_path):
    from tool_helpers import ANSWER, QUESTION, RESULT, TEMPLATE, TOOLS

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    pid, fd = pty.fork()
    if pid == 0:
        args = ["chat", "--model", str(tool_llama_dir), "--template", TEMPLATE, "--tools"]
        args += [str(tools), "--temperature", "0", "--max-new-tokens", "48"]
        os.execv(sys.executable, [sys.executable, "-m", "corral", *args])
    _read_until(fd, b"User: ")
    os.write(fd, b"/tool too early\n")
    assert b"(no tool call to answer)" in _read_until(fd, b"User: ")
    os.write(fd, QUESTION["content"].encode() + b"\n")
    assert '→ get_weather({"city":"Paris"})'.encode() in _read_until(fd, b"User: ")
    os.write(fd, f"/tool {RESULT}\n".encode())
    assert ANSWER.encode() in _read_until(fd, b"User: ")
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
