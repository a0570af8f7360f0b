"""Fuzz `corral serve` with schemathesis against its own OpenAPI schema: never a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="fuzzing needs the test extra")
hypothesis = pytest.importorskip("hypothesis")

# A short context keeps every generated request cheap: larger budgets are rejected with 400.
CONTEXT = 96


@pytest.fixture(scope="module")
def api_schema(tiny_llama_dir):
    from test_serve import start_server, stop_server

    process, url = start_server(
        "--model", str(tiny_llama_dir), "--max-model-len", str(CONTEXT), "--max-concurrency", "4"
    )
    yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    assert stop_server(process) == 0


OPERATIONS = [
    ("/health", "GET"),
    ("/v1/models", "GET"),
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
]


# Hypothesis strategies per operation rather than `@schema.parametrize()`: schemathesis' pytest
# fixture integration reads a private pytest attribute that pytest 9 removed.
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_no_request_makes_the_server_fail(api_schema, path, method):
    @hypothesis.given(case=api_schema[path][method].as_strategy())
    @hypothesis.settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case):
        response = case.call(timeout=60)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) >= {"message", "type"}

    check()


def test_the_schema_lists_every_route(api_schema):
    paths = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert paths == set(OPERATIONS)
