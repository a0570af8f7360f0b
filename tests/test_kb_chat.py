"""`corral chat --kb` and `corral serve --kb`: the same answers-with-sources as `corral kb ask`.

One knowledge base is built by `corral kb add` in a temporary $CORRAL_HOME; the tiny model's
replies are noise, so the tests check what retrieval decides: the sources, and the fixed
"I don't know." when nothing is relevant (the model is then not asked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from test_serve import start_server, stop_server

SRC = Path(__file__).resolve().parents[1] / "src"
VAULT = """# Zorblax Station

## Security

The access code for the Zorblax vault is 7391-QX. Only the quartermaster may change it.
"""
RIVER = "The Quillon river flows north for 812 kilometres.\n"
QUESTION = "What is the access code for the Zorblax vault?"
UNANSWERABLE = "What is the capital city of Atlantis?"


@pytest.fixture(scope="module")
def kb_env(tmp_path_factory) -> dict:
    """The environment of a $CORRAL_HOME holding knowledge base `facts` (vault.md, river.txt)."""
    docs = tmp_path_factory.mktemp("facts")
    (docs / "vault.md").write_text(VAULT, encoding="utf-8")
    (docs / "river.txt").write_text(RIVER, encoding="utf-8")
    home = tmp_path_factory.mktemp("corral_home")
    env = {
        **os.environ,
        "CORRAL_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    added = _corral(env, "kb", "add", "facts", str(docs))
    assert added.returncode == 0, added.stderr
    return env


def _corral(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def kb_client(kb_env, tiny_llama_dir):
    process, url = start_server("--model", str(tiny_llama_dir), "--kb", "facts", env=kb_env)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert stop_server(process) == 0


def _ask(client, question: str, **kwargs):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, **kwargs
    )


@pytest.mark.slow
def test_serve_kb_returns_the_sources_in_an_extra_field(kb_client, smol_tokenizer):
    reply = _ask(kb_client, QUESTION)
    sources = reply.model_extra["sources"]
    assert Path(sources[0]["file"]).name == "vault.md"
    assert sources[0]["lines"] == "5"
    assert "7391-QX" in sources[0]["text"]
    passage = smol_tokenizer(sources[0]["text"])["input_ids"]
    assert reply.usage.prompt_tokens > len(passage)  # the model was given the passage
    assert reply.choices[0].message.content  # the tiny model's noise, but generated

    chunks = list(_ask(kb_client, QUESTION, stream=True))
    ends = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(ends) == 1
    assert ends[0].model_extra["sources"] == sources
    assert all("sources" not in c.model_extra for c in chunks if c is not ends[0])


@pytest.mark.slow
def test_serve_kb_unanswerable_is_i_dont_know_without_sources(kb_client):
    reply = _ask(kb_client, UNANSWERABLE)
    assert reply.choices[0].message.content == "I don't know."
    assert reply.model_extra["sources"] == []
    assert reply.usage.completion_tokens == 0  # the model was not asked

    chunks = list(_ask(kb_client, UNANSWERABLE, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "I don't know."
    assert chunks[-1].model_extra["sources"] == []


@pytest.mark.slow
def test_chat_kb_prints_the_sources_after_each_reply(kb_env, tiny_llama_dir):
    result = _corral(
        kb_env,
        "chat",
        "--kb",
        "facts",
        "--model",
        str(tiny_llama_dir),
        "--max-new-tokens",
        "8",
        stdin=f"{QUESTION}\n{UNANSWERABLE}\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "answering from knowledge base 'facts'" in result.stdout
    first, second = result.stdout.split("User: ")[1:3]
    assert "\nSources:\n[1] " in first
    source = first.split("\nSources:\n")[1].splitlines()[0]
    assert "vault.md lines 5" in source, source
    assert "Assistant: I don't know.\n" in second
    assert "Sources:" not in second


@pytest.mark.slow
def test_chat_kb_prompt_says_i_dont_know_without_sources(kb_env, tiny_llama_dir):
    result = _corral(
        kb_env, "chat", "--kb", "facts", "--model", str(tiny_llama_dir), "--prompt", UNANSWERABLE
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "I don't know.\n"


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_missing_kb_is_one_clear_error_before_the_model_loads(kb_env, command):
    # A model folder that does not hold a model: loading it would fail differently, so the
    # kb error shows the knowledge base was checked first.
    result = _corral(kb_env, command, "--kb", "nosuch", "--model", str(SRC))
    assert result.returncode != 0
    assert "no knowledge base 'nosuch' (existing: facts)" in result.stderr
    assert "Traceback" not in result.stderr
