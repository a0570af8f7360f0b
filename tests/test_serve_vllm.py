"""The vLLM backend's glue, driven by a fake `vllm` module (vLLM itself needs a GPU).

The fake records what the backend passes (engine args, sampling params, prompts) and streams
scripted outputs the way vLLM does with `RequestOutputKind.DELTA`: each output carries only
the new token ids, the last one is `finished` with a finish reason.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.machinery
import sys
import threading
import types
from types import SimpleNamespace

import pytest

from corral.config.fields import ModelConfig
from corral.infer.batching import Delta, SamplingParams


class FakeEngine:
    """Streams `self.plan` (lists of new ids, then a finish reason) for every request."""

    model_config = SimpleNamespace(max_model_len=512)

    def __init__(self, args):
        self.args = args
        self.requests: list[tuple] = []
        self.aborted: list[str] = []
        self.plan: list[list[int]] = []
        self.finish_reason = "stop"
        self.forever = False
        self.error: Exception | None = None
        self.shut_down = False

    async def generate(self, prompt, sampling_params, request_id):
        self.requests.append((prompt, sampling_params, request_id))
        try:
            chunks = self.plan
            for index, ids in enumerate(chunks):
                await asyncio.sleep(0)
                if self.error is not None:
                    raise self.error
                last = index == len(chunks) - 1 and not self.forever
                completion = SimpleNamespace(
                    token_ids=list(ids), finish_reason=self.finish_reason if last else None
                )
                yield SimpleNamespace(outputs=[completion], finished=last)
            while self.forever:
                await asyncio.sleep(0.01)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request_id)  # what vLLM does: abort the request
            raise

    def shutdown(self):
        self.shut_down = True


class Recorded:
    """Stands in for vLLM's argument classes: keeps the keyword arguments it was given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _fake_vllm() -> tuple[types.ModuleType, types.ModuleType]:
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.AsyncEngineArgs = Recorded
    vllm.SamplingParams = Recorded
    vllm.TokensPrompt = dict  # a TypedDict in vLLM
    vllm.AsyncLLMEngine = SimpleNamespace(from_engine_args=FakeEngine)
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = RequestOutputKind
    return vllm, sampling


@pytest.fixture
def backend(monkeypatch, tiny_llama_dir):
    import torch

    from corral.serve.backends import load_backend

    vllm, sampling = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = load_backend("vllm", ModelConfig(model_name_or_path=str(tiny_llama_dir)), 16)
    yield backend
    backend.close()
    assert backend.engine.shut_down


def _submit(backend, params: SamplingParams, prompt=(1, 2, 3)):
    """Submit and wait for the finishing delta (or an exception); return (handle, items)."""
    items: list = []
    done = threading.Event()

    def sink(item):
        items.append(item)
        if not isinstance(item, Delta) or item.finish_reason:
            done.set()

    handle = backend.submit(list(prompt), params, sink)
    assert done.wait(10), items
    return handle, items


def _wait(condition) -> bool:
    for _ in range(200):
        if condition():
            return True
        threading.Event().wait(0.01)
    return False


def test_engine_args_and_context(backend, tiny_llama_dir):
    assert backend.engine.args.kwargs == {
        "model": str(tiny_llama_dir),
        "max_num_seqs": 16,
        "trust_remote_code": False,
        "dtype": "auto",
    }
    assert backend.context_len == 512


def test_every_sampling_parameter_is_passed_to_vllm(backend):
    backend.engine.plan = [[5]]
    params = SamplingParams(
        max_tokens=7,
        temperature=0.7,
        top_p=0.8,
        top_k=0,
        seed=11,
        stop=("END", "\n\n"),
        presence_penalty=0.5,
        frequency_penalty=-0.25,
    )
    _submit(backend, params, prompt=[9, 8, 7])
    prompt, sent, _ = backend.engine.requests[-1]
    assert prompt == {"prompt_token_ids": [9, 8, 7]}
    assert backend.stop_ids, "the template should give stop ids to pass on"
    assert sent.kwargs == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": -1,
        "seed": 11,
        "stop": [*backend.stop_texts, "END", "\n\n"],
        "stop_token_ids": list(backend.stop_ids),
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "output_kind": RequestOutputKind.DELTA,
    }
    _submit(backend, SamplingParams(max_tokens=3, temperature=1e-30, top_k=5))
    sent = backend.engine.requests[-1][1].kwargs
    assert (sent["temperature"], sent["top_k"], sent["seed"]) == (0.0, 5, None)


def _ids(backend, text: str) -> list[int]:
    return backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_deltas_join_to_the_text_and_vllm_finish_reasons_pass_through(backend):
    ids = _ids(backend, "Hello world, 你好！")
    backend.engine.plan = [ids[i : i + 2] for i in range(0, len(ids), 2)]
    for reason in ("stop", "length", "abort"):
        backend.engine.finish_reason = reason
        handle, items = _submit(backend, SamplingParams(max_tokens=100))
        assert "".join(d.text for d in items) == "Hello world, 你好！"
        assert all(d.finish_reason is None for d in items[:-1])
        assert items[-1].finish_reason == ("length" if reason == "length" else "stop")
        assert items[-1].completion_tokens == len(ids) and handle.finished
    assert backend.engine.aborted == []
    assert _wait(lambda: backend.load() == 0)


def test_budget_stop_strings_and_stop_ids_end_the_request_in_vllm(backend):
    ids = _ids(backend, "one two three four five six")
    backend.engine.plan = [[i] for i in ids]
    _, items = _submit(backend, SamplingParams(max_tokens=3))
    assert (items[-1].finish_reason, items[-1].completion_tokens) == ("length", 3)
    assert "".join(d.text for d in items) == backend.tokenizer.decode(ids[:3])
    _, items = _submit(backend, SamplingParams(max_tokens=50, stop=(" four",)))
    assert "".join(d.text for d in items) == "one two three"
    assert items[-1].finish_reason == "stop"
    backend.engine.plan = [ids[:2], [backend.stop_ids[0]], ids[2:]]
    _, items = _submit(backend, SamplingParams(max_tokens=50))
    assert "".join(d.text for d in items) == backend.tokenizer.decode(ids[:2])
    assert (items[-1].finish_reason, items[-1].completion_tokens) == ("stop", 3)
    # the tracker finished before vLLM did, so the streams were closed: vLLM aborts them
    assert _wait(lambda: len(backend.engine.aborted) == 3)


def test_cancel_aborts_in_vllm_and_errors_reach_the_sink(backend):
    backend.engine.plan, backend.engine.forever = [[5]], True
    got: list = []
    handle = backend.submit([1, 2], SamplingParams(max_tokens=50), got.append)
    assert _wait(lambda: backend.engine.requests) and backend.load() == 1
    handle.cancel()
    assert _wait(lambda: backend.engine.aborted) and _wait(lambda: backend.load() == 0)
    backend.engine.forever, backend.engine.error = False, RuntimeError("engine died")
    _, items = _submit(backend, SamplingParams(max_tokens=50))
    assert isinstance(items[-1], RuntimeError)


def test_adapters_and_gguf_files_are_refused_with_the_fix(monkeypatch, tmp_path):
    import torch

    from corral.serve.backends import load_backend
    from corral.utils.errors import CorralError

    vllm, sampling = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(CorralError, match="merge them first"):
        load_backend("vllm", ModelConfig(adapter_name_or_path=["saves/sft"]), 8)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CorralError, match="--backend llamacpp"):
        load_backend("vllm", ModelConfig(model_name_or_path=str(gguf)), 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CorralError, match="needs a CUDA GPU"):
        load_backend("vllm", ModelConfig(), 8)


def test_tool_calls_through_vllm_share_the_template_rendering_and_parsing(
    monkeypatch, tiny_llama_dir
):
    """The API on the vLLM backend: tools rendered into the prompt ids, a named tool_choice
    pre-filled, and vLLM's reply parsed into tool_calls, as with the other backends."""
    import torch
    from fastapi.testclient import TestClient

    from corral.serve.app import create_app
    from corral.serve.backends import load_backend
    from tool_helpers import QUESTION, TOOLS

    vllm, sampling = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = ModelConfig(model_name_or_path=str(tiny_llama_dir), template="chatml")
    backend = load_backend("vllm", config, 4)
    backend.engine.plan = [_ids(backend, ' {"city": "Paris"}}\n</tool_call>')]
    body = {
        "messages": [QUESTION],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 40,
    }
    with TestClient(create_app(backend, served_model_name="fake")) as client:
        reply = client.post("/v1/chat/completions", json=body).json()
    (prompt, _, _), *_ = backend.engine.requests
    forced = '<tool_call>\n{"name": "get_weather", "arguments":'
    assert prompt["prompt_token_ids"] == backend.chat_ids([QUESTION], TOOLS, forced)
    assert backend.tokenizer.decode(prompt["prompt_token_ids"]).endswith(forced)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
