"""`corral serve` under load: backpressure (429), the request timeout (504 / an error event),
and a bounded soak of the real server (benchmarks/soak.py) with mixed and hostile clients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve tests need the serve extra")
from fastapi.testclient import TestClient  # noqa: E402

from corral.serve.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class StuckBackend:
    """A backend that accepts requests and never answers: what a saturated server looks like."""

    template = None
    context_len = 64

    def __init__(self):
        self.handles = []

    class _Handle:
        finished = False

        def __init__(self):
            self.cancelled = False

        def cancel(self):
            self.cancelled = True

    tokenizer = list(range(100))

    def text_ids(self, prompt):
        return [1, 2, 3]

    def submit(self, prompt_ids, params, sink):
        self.handles.append(self._Handle())
        return self.handles[-1]

    def load(self):
        return sum(not h.cancelled for h in self.handles)

    def close(self):
        pass


def _client(backend, **settings) -> TestClient:
    return TestClient(create_app(backend, served_model_name="stuck", **settings))


def test_a_full_queue_gets_429_with_retry_after():
    backend = StuckBackend()
    backend.handles = [StuckBackend._Handle(), StuckBackend._Handle()]  # two in flight
    with _client(backend, max_queue=2) as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and "--max-queue" in error["message"]
    assert len(backend.handles) == 2  # nothing was submitted


def test_a_request_past_the_timeout_gets_504_and_is_cancelled():
    backend = StuckBackend()
    with _client(backend, max_queue=8, request_timeout=0.3) as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "n": 2})
    assert response.status_code == 504, response.text
    assert "--request-timeout of 0.3 s" in response.json()["error"]["message"]
    assert len(backend.handles) == 2 and all(h.cancelled for h in backend.handles)
    assert backend.load() == 0  # its place in the queue is free again


def test_a_stream_past_the_timeout_ends_with_an_error_event():
    backend = StuckBackend()
    with _client(backend, request_timeout=0.3) as client:
        body = {"prompt": "hi", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200  # the status went out before the timeout
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) == 1, events
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert error["type"] == "timeout_error" and error["code"] == "504"
    assert all(h.cancelled for h in backend.handles)


@pytest.mark.slow
def test_soak_mixed_clients_no_5xx_no_leak(tiny_llama_dir):
    """The bounded soak: 16 clients; every reply complete or a clean error; RSS flat; alive."""
    command = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--json"]
    command += ["--model", str(tiny_llama_dir), "--requests", "150", "--clients", "16"]
    command += ["--max-seconds", "60", "--max-tokens", "8", "--warmup", "33"]
    command += ["--max-queue", "24"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.stdout, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failures"] == [] and summary["server_errors"] == 0, summary
    assert summary["idle_after"] and summary["still_answers"], summary
    assert summary["rss_growth"] <= 0.05, summary
    # every kind ran and ended as it should: replies, clean rejections, deliberate hang-ups
    assert summary["outcomes"].get("ok", 0) > 0 and summary["outcomes"].get("rejected", 0) > 0
    assert summary["outcomes"].get("disconnected", 0) > 0
    assert summary["passed"], summary
