"""Tool calling through `corral serve`, driven as a user would: the official `openai` client
sends `tools`, gets `tool_calls`, answers as the tool and gets the final reply, from a tiny
model trained on that exchange (`tool_helpers`)."""

from __future__ import annotations

import json

import pytest

from test_serve import start_server, stop_server
from tool_helpers import ANSWER, ARGUMENTS, QUESTION, RESULT, TEMPLATE, TOOLS, WEATHER, exchange

openai = pytest.importorskip("openai", reason="the serve tests need the test extra: openai")
httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra: httpx")

FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_server(tool_llama_dir):
    process, url = start_server("--model", str(tool_llama_dir), "--template", TEMPLATE)
    yield url
    assert stop_server(process) == 0


@pytest.fixture
def client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server}/v1", api_key="unused", max_retries=0)


def _ask(client, messages, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 48, "tools": TOOLS, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def _streamed(client, messages, **kwargs) -> tuple[str, list, list]:
    """(content, tool calls rebuilt from the deltas, the chunks) of a streamed reply."""
    chunks = list(_ask(client, messages, stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for piece in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], chunks


def _one_weather_call(message) -> str:
    """The id of the message's only call, after checking it is get_weather(city=Paris)."""
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS
    return call.id


@pytest.mark.parametrize("choice", [FORCE_WEATHER, "required", "auto"])
def test_round_trip_call_then_answer(client, choice):
    first = _ask(client, [QUESTION], tool_choice=choice)
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    call_id = _one_weather_call(first.choices[0].message)
    tool_turn = {"role": "tool", "tool_call_id": call_id, "content": RESULT}
    final = _ask(client, [QUESTION, first.choices[0].message, tool_turn])
    assert final.choices[0].message.content == ANSWER
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"


def test_streamed_round_trip_sends_openai_call_deltas(client):
    content, calls, chunks = _streamed(client, [QUESTION], tool_choice=FORCE_WEATHER)
    assert content == ""
    (call,) = calls
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == ARGUMENTS
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    opening, *rest = pieces
    assert opening.id == call["id"] and opening.type == "function"
    assert opening.function.name == "get_weather" and opening.function.arguments == ""
    assert rest and all(p.id is None and p.function.name is None for p in rest)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [
        "tool_calls"
    ]
    history = [
        QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": RESULT},
    ]
    answer, no_calls, chunks = _streamed(client, history)
    assert answer == ANSWER and no_calls == []
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_every_choice_is_parsed(client):
    reply = _ask(client, [QUESTION], tool_choice=FORCE_WEATHER, n=2)
    assert [c.finish_reason for c in reply.choices] == ["tool_calls", "tool_calls"]
    ids = [_one_weather_call(c.message) for c in reply.choices]
    assert ids[0] != ids[1]


def test_a_cut_off_call_comes_back_as_plain_content(client, smol_tokenizer):
    from corral.data.templates import call_prefix, get_template

    # three tokens are not enough to finish the arguments: the call is malformed
    reply = _ask(client, [QUESTION], tool_choice=FORCE_WEATHER, max_tokens=3)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    template = get_template(TEMPLATE, smol_tokenizer)
    assert choice.message.content.startswith(call_prefix(template, "get_weather"))
    content, calls, chunks = _streamed(client, [QUESTION], tool_choice=FORCE_WEATHER, max_tokens=3)
    assert content == choice.message.content and calls == []
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tool_choice_none_answers_without_calls(client):
    reply = _ask(client, [QUESTION], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason != "tool_calls"
    content, calls, _ = _streamed(client, [QUESTION], tool_choice="none")
    assert calls == [] and content == reply.choices[0].message.content


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "fly"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs `tools`"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
    ],
)
def test_impossible_tool_requests_are_400(client, change, param, message):
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        _ask(client, [QUESTION], **change)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [QUESTION, {"role": "tool", "content": "21 C"}]}, "messages"),
        ({"messages": [{**QUESTION, "tool_calls": exchange()[1]["tool_calls"]}]}, "messages"),
    ],
)
def test_malformed_tool_fields_are_422_naming_the_field(tool_server, body, field):
    request = {"messages": [QUESTION], "max_tokens": 2, **body}
    response = httpx.post(f"{tool_server}/v1/chat/completions", json=request)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith(field)


def test_a_template_without_a_tool_format_refuses_tools(tiny_llama_dir):
    process, url = start_server("--model", str(tiny_llama_dir), "--template", "llama2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="'llama2' chat template") as caught:
            _ask(client, [QUESTION])
        assert caught.value.body["param"] == "tools"
        plain = _ask(client, [QUESTION], tools=None, max_tokens=2)
        assert plain.choices[0].message.tool_calls is None
    finally:
        assert stop_server(process) == 0


def _fed(plan, pieces: list[str]) -> tuple[str, list[dict], bool]:
    """(content, tool_calls deltas, called) a CallStream sends for a reply fed in pieces."""
    from corral.serve.tool_calls import CallStream

    stream = CallStream(plan)
    deltas = [d for piece in pieces for d in stream.feed(piece)]
    ending, called = stream.finish()
    deltas += ending
    content = "".join(d.get("content", "") for d in deltas)
    return content, [c for d in deltas for c in d.get("tool_calls", [])], called


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("reply", "content", "called"),
    [
        (CALL_TEXT, "", True),
        (f"Let me look.\n{CALL_TEXT}", "Let me look.\n", True),
        ("a <b> and <tool or <tool_cal", "a <b> and <tool or <tool_cal", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"ci', None, False),
        ("  \n", "  \n", False),
    ],
)
def test_a_streamed_reply_says_what_the_whole_reply_says(smol_tokenizer, reply, content, called):
    """Fed one character at a time, the stream sends what the reply holds: text as content, a
    call once whole (opening delta with id and name, then the arguments), a broken call as text."""
    from corral.data.templates import get_template
    from corral.serve.tool_calls import ToolPlan, reply_message

    plan = ToolPlan(get_template(TEMPLATE, smol_tokenizer), TOOLS, parse=True)
    sent, calls, made = _fed(plan, list(reply))
    assert sent == (reply if content is None else content) and made == called
    message, finish = reply_message(plan, reply, "stop")
    assert finish == ("tool_calls" if called else "stop")
    if called:
        opening, arguments = calls
        assert opening["id"].startswith("call_") and opening["type"] == "function"
        assert opening["function"] == {"name": "get_weather", "arguments": ""}
        assert json.loads(arguments["function"]["arguments"]) == ARGUMENTS
        assert (
            message["tool_calls"][0]["function"]["arguments"] == arguments["function"]["arguments"]
        )
    else:
        assert calls == [] and message == {"role": "assistant", "content": reply}


def test_parallel_tool_calls_false_keeps_the_first_call(client, smol_tokenizer):
    from corral.data.templates import get_template
    from corral.serve.tool_calls import ToolPlan, reply_message

    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    both = f"{CALL_TEXT}\n{time_call}"

    def called(first_only: bool) -> tuple[list, list]:
        plan = ToolPlan(get_template(TEMPLATE, smol_tokenizer), TOOLS, True, "", first_only)
        whole = reply_message(plan, both, "stop")[0]["tool_calls"]
        streamed = [c for c in _fed(plan, [both])[1] if "name" in c["function"]]
        return [c["function"]["name"] for c in whole], [c["function"]["name"] for c in streamed]

    assert called(False) == (["get_weather", "get_time"], ["get_weather", "get_time"])
    assert called(True) == (["get_weather"], ["get_weather"])
    reply = _ask(client, [QUESTION], tool_choice=FORCE_WEATHER, parallel_tool_calls=False)
    _one_weather_call(reply.choices[0].message)


def test_the_held_out_tool_call_script_counts_the_served_models_calls(tool_server, tmp_path):
    """examples/tool_calls_heldout.py, as the README runs it, on glaive-style rows (sharegpt
    with a tools column) of the weather exchange: each held-out row is cut before its call, and
    the served model's calls parse, name get_weather and carry its arguments."""
    import subprocess
    import sys
    from pathlib import Path

    call = {"name": "get_weather", "arguments": ARGUMENTS}
    turns = [("human", QUESTION["content"]), ("function_call", json.dumps(call))]
    turns += [("observation", RESULT), ("gpt", ANSWER)]
    row = {
        "conversations": [{"from": f, "value": v} for f, v in turns],
        "tools": json.dumps([tool["function"] for tool in TOOLS]),  # bare, as glaive has them
    }
    (tmp_path / "calls.json").write_text(json.dumps([row] * 4))
    columns = {"messages": "conversations", "tools": "tools"}
    entry = {"file_name": "calls.json", "formatting": "sharegpt", "columns": columns}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"calls": entry}))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"dataset: calls\ndataset_dir: {tmp_path}\ntemplate: {TEMPLATE}\nval_size: 3\n"
    )
    script = Path(__file__).resolve().parents[1] / "examples" / "tool_calls_heldout.py"
    run = subprocess.run(
        [sys.executable, str(script), str(config), "--base-url", f"{tool_server}/v1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('got get_weather({"city":"Paris"})') == 3, run.stdout
    assert "3 held-out rows with a tool call (of 3 held out)" in run.stdout
    assert "parsed tool_calls: 3/3, right function: 3/3, same arguments: 3/3" in run.stdout
