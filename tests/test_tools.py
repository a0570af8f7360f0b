"""Tool calling in templates: the published formats token for token, replies parsed back."""

from __future__ import annotations

import json

import pytest

from conftest import CHAT_TEMPLATES
from corral.data.templates import (
    ToolCall,
    call_prefix,
    chat_messages,
    chat_tools,
    encode_prompt,
    encode_turns,
    get_template,
    parse_reply,
    render,
)
from corral.data.templates.families import TEMPLATES
from corral.utils.errors import CorralError

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "description": "Local time", "parameters": {"type": "object"}}
TOOLS = [WEATHER, TIME]  # bare, as glaive rows hold them; OpenAI's wrapped shape is tested too
SYS = "You are a travel assistant."


def call(name: str, **arguments) -> dict:
    """A record's function_call turn."""
    return {"role": "function_call", "content": json.dumps({"name": name, "arguments": arguments})}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def tool(text: str) -> dict:
    return {"role": "tool", "content": text}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


# Conversations every tool format renders (one call per reply, as Llama 3.1 allows).
SINGLE_CALLS = {
    "call, result, answer": [
        user("Weather in Paris?"),
        call("get_weather", city="Paris", unit="celsius"),
        tool('{"temperature": 18, "sky": "sunny"}'),
        reply("It is 18°C and sunny in Paris."),
    ],
    "answer, then a call in a later turn": [
        user("Hi!"),
        reply("Hello! How can I help?"),
        user("What time is it in Tokyo?"),
        call("get_time", city="Tokyo"),
        tool("21:04"),
        reply("It is 21:04 in Tokyo."),
        user("Thanks."),
        reply("You're welcome."),
    ],
}
# Two calls in one reply (OpenAI's shape, arguments as JSON text) and two results.
PARALLEL_CALLS = [
    user("Weather and time in Rome?"),
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    {"role": "tool", "tool_call_id": "c2", "content": "10:30"},
    reply("In Rome it is 22C at 10:30."),
]


def reference(tok, jinja: str, messages: list[dict], generation: bool) -> tuple[str, list[int]]:
    """The published template's text and ids, given messages and tools as HF templates take
    them (what `chat_messages` and `chat_tools` produce)."""
    kwargs = {
        "chat_template": jinja,
        "tools": chat_tools(TOOLS),
        "add_generation_prompt": generation,
    }
    text = tok.apply_chat_template(chat_messages(messages), tokenize=False, **kwargs)
    ids = tok.apply_chat_template(chat_messages(messages), tokenize=True, **kwargs)
    return text, ids if isinstance(ids, list) else ids["input_ids"]  # transformers 5


def assert_equal_to_reference(template, tok, jinja: str, messages: list[dict]) -> None:
    """Whole text, whole ids and every reply's prompt ids equal the published template's."""
    text, ids = reference(tok, jinja, messages, generation=False)
    assert render(template, tok, messages, add_generation_prompt=False, tools=TOOLS) == text
    pairs = encode_turns(template, tok, messages, tools=TOOLS)
    assert [i for prompt, response in pairs for i in prompt + response] == ids
    replies = [i for i, m in enumerate(messages) if m["role"] in ("assistant", "function_call")]
    assert len(pairs) == len(replies)
    for i in replies:
        _, prompt_ids = reference(tok, jinja, messages[:i], generation=True)
        assert encode_prompt(template, tok, messages[:i], tools=TOOLS) == prompt_ids


QWEN25 = (CHAT_TEMPLATES / "qwen2.5-instruct.jinja").read_text()
LLAMA31 = (CHAT_TEMPLATES / "llama-3.1-instruct.jinja").read_text()


@pytest.mark.parametrize("conversation", [*SINGLE_CALLS.values(), PARALLEL_CALLS])
@pytest.mark.parametrize("system", [None, SYS])
def test_qwen_with_tools_is_qwen25s_published_template(smol_tokenizer, conversation, system):
    messages = ([{"role": "system", "content": system}] if system else []) + conversation
    assert_equal_to_reference(
        get_template("qwen", smol_tokenizer), smol_tokenizer, QWEN25, messages
    )


@pytest.mark.parametrize("conversation", [*SINGLE_CALLS.values(), PARALLEL_CALLS])
@pytest.mark.parametrize("system", ["", SYS])
def test_chatml_with_tools_is_qwen25s_template_without_its_default_system(
    smol_tokenizer, conversation, system
):
    """chatml has no default system prompt: with tools and none given, Qwen's block starts
    empty, as Qwen2.5's template renders an empty system message."""
    template = get_template("chatml", smol_tokenizer)
    reference_messages = [{"role": "system", "content": system}, *conversation]
    ours = reference_messages if system else conversation
    text, ids = reference(smol_tokenizer, QWEN25, reference_messages, generation=False)
    assert render(template, smol_tokenizer, ours, add_generation_prompt=False, tools=TOOLS) == text
    pairs = encode_turns(template, smol_tokenizer, ours, tools=TOOLS)
    assert [i for prompt, response in pairs for i in prompt + response] == ids


@pytest.mark.parametrize("conversation", SINGLE_CALLS.values())
@pytest.mark.parametrize("system", [None, SYS])
def test_llama3_with_tools_is_llama31s_published_template(
    llama3_style_tokenizer, conversation, system
):
    tok = llama3_style_tokenizer
    messages = ([{"role": "system", "content": system}] if system else []) + conversation
    assert_equal_to_reference(get_template("llama3", tok), tok, LLAMA31, messages)


def test_llama3_refuses_two_calls_in_one_reply_as_llama31_does(llama3_style_tokenizer):
    template = get_template("llama3", llama3_style_tokenizer)
    with pytest.raises(CorralError, match="one tool call per reply"):
        render(
            template,
            llama3_style_tokenizer,
            PARALLEL_CALLS,
            add_generation_prompt=False,
            tools=TOOLS,
        )


def test_default_format_is_llama_factorys(smol_tokenizer):
    """LLaMA-Factory's DefaultToolUtils text, written out by hand from its formatter."""
    template = get_template("default", smol_tokenizer)
    messages = [{"role": "system", "content": SYS}, *SINGLE_CALLS["call, result, answer"]]

    text = render(template, smol_tokenizer, messages, add_generation_prompt=False, tools=TOOLS)

    eos = smol_tokenizer.eos_token
    assert text == (
        f"System: {SYS}You have access to the following tools:\n"
        "> Tool Name: get_weather\nTool Description: Current weather in a city\nTool Args:\n"
        "  - city (string, required): City name\n"
        "  - unit (string): , should be one of [celsius, fahrenheit]\n\n"
        "> Tool Name: get_time\nTool Description: Local time\nTool Args:\n\n"
        "Use the following format if using a tool:\n```\n"
        "Action: tool name (one of [get_weather, get_time])\n"
        "Action Input: the input to the tool, in a JSON format representing the kwargs "
        '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
        f"{eos}\nHuman: Weather in Paris?{eos}\nAssistant:"
        'Action: get_weather\nAction Input: {"city": "Paris", "unit": "celsius"}'
        f"{eos}\nHuman: " + '{"temperature": 18, "sky": "sunny"}' + f"{eos}\nAssistant:"
        f"It is 18°C and sunny in Paris.{eos}\n"
    )


def test_without_tools_every_template_renders_as_before(smol_tokenizer):
    """Tools change nothing for conversations without them (test_templates pins that text);
    here: an empty tool list is no tools."""
    for name in ("chatml", "qwen", "llama3", "mistral", "default"):
        template = get_template(name, smol_tokenizer)
        plain = [user("Hi"), reply("Hello.")]
        assert render(
            template, smol_tokenizer, plain, add_generation_prompt=False, tools=[]
        ) == render(template, smol_tokenizer, plain, add_generation_prompt=False)


# --- Replies parsed back into calls ----------------------------------------------------------

FORMATS = ["qwen", "llama3", "mistral", "default"]


def rendered_reply(template, tok, messages: list[dict]) -> str:
    """The last reply as the model would generate it: the text the template writes after the
    generation prompt, up to the stop word."""
    prompt = render(template, tok, messages[:-1], add_generation_prompt=True, tools=TOOLS)
    whole = render(template, tok, messages, add_generation_prompt=False, tools=TOOLS)
    text = whole[len(prompt) :]
    for word in template.stop_words:
        text = text.split(word)[0]
    return text


@pytest.mark.parametrize("name", ["qwen", "chatml", "llama3", "mistral", "default"])
def test_a_rendered_call_parses_back_and_starts_with_the_call_prefix(
    smol_tokenizer, llama3_style_tokenizer, name
):
    tok = llama3_style_tokenizer if name == "llama3" else smol_tokenizer
    template = get_template(name, tok)
    messages = [user("Weather in Paris?"), call("get_weather", city="Paris", unit="celsius")]

    text = rendered_reply(template, tok, messages)

    assert parse_reply(template, text) == (
        "",
        [ToolCall("get_weather", '{"city":"Paris","unit":"celsius"}')],
    )
    assert text.startswith(call_prefix(template))
    assert text.startswith(call_prefix(template, "get_weather"))
    assert call_prefix(template, "get_weather").startswith(call_prefix(template))


@pytest.mark.parametrize("name", ["qwen", "mistral", "default"])
def test_parallel_calls_parse_back_in_order(smol_tokenizer, name):
    template = get_template(name, smol_tokenizer)
    text = rendered_reply(template, smol_tokenizer, PARALLEL_CALLS[:2])

    _, calls = parse_reply(template, text)

    assert calls == [
        ToolCall("get_weather", '{"city":"Rome"}'),
        ToolCall("get_time", '{"city":"Rome"}'),
    ]


def test_qwen_text_before_a_call_is_the_content():
    content, calls = parse_reply(
        TEMPLATES["qwen"],
        'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
    )
    assert (content, calls) == ("Let me check.", [ToolCall("get_time", '{"city":"Oslo"}')])


MALFORMED = {
    "qwen": [
        '<tool_call>\n{"name": "get_time", "arguments": {city: Oslo}}\n</tool_call>',
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": [1, 2]}\n</tool_call>',
    ],
    "llama3": ['{"answer": 42}', '{"name": "get_time", "parameters": {', "[1, 2]"],
    "mistral": ['[TOOL_CALLS] [{"name": "get_time", "arguments": ', "[TOOL_CALLS] nonsense"],
    "default": ["Action: get_time\nAction Input: city=Oslo"],
}


@pytest.mark.parametrize("name", FORMATS)
def test_plain_and_malformed_replies_come_back_as_text(name):
    template = TEMPLATES[name]
    for text in ["The answer is 42.", "", *MALFORMED[name]]:
        assert parse_reply(template, text) == (text, [])


def test_a_template_without_tools_has_no_call_prefix_and_parses_nothing():
    assert parse_reply(TEMPLATES["alpaca"], '<tool_call>\n{"name": "x"}\n</tool_call>')[1] == []
    with pytest.raises(CorralError, match="'alpaca' chat template has no place for tools"):
        call_prefix(TEMPLATES["alpaca"])


# --- Message shapes, tokenizer templates, tool_format ----------------------------------------


def test_record_and_openai_calls_become_one_template_shape():
    record = chat_messages([call("get_time", city="Oslo")])
    openai = chat_messages(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c9",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            }
        ]
    )
    function = {"name": "get_time", "arguments": {"city": "Oslo"}}
    assert record == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": function}],
        }
    ]
    assert openai == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c9", "type": "function", "function": function}],
        }
    ]
    assert chat_messages(openai) == openai  # already in shape: unchanged
    plain = [user("hi"), tool("42"), {"role": "assistant", "content": "ok", "tool_calls": []}]
    assert chat_messages(plain) == [user("hi"), tool("42"), reply("ok")]


def test_a_malformed_record_call_is_an_error_naming_it():
    with pytest.raises(CorralError, match="tool call must be JSON.*function_call"):
        chat_messages([{"role": "function_call", "content": "get_time(Oslo)"}])


@pytest.mark.parametrize(
    ("jinja", "expected"), [(QWEN25, "qwen"), (LLAMA31, "llama3"), ("{{ messages }}", None)]
)
def test_the_tokenizers_own_template_gets_its_tool_format(smol_tokenizer, jinja, expected):
    tok = smol_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = jinja
        assert get_template(None, tok).tool_format == expected
    finally:
        tok.chat_template = saved


def test_tool_format_must_be_the_templates_own(smol_tokenizer):
    assert get_template("chatml", smol_tokenizer, tool_format="qwen").tool_format == "qwen"
    with pytest.raises(CorralError, match="tool_format 'qwen'.*'llama3'.*writes tools as 'llama3'"):
        get_template("llama3", smol_tokenizer, tool_format="qwen")
    with pytest.raises(CorralError, match="tool_format 'qwen'.*'alpaca'.*has none"):
        get_template("alpaca", smol_tokenizer, tool_format="qwen")
    with pytest.raises(
        CorralError,
        match="tool_format 'glm4' is not built; use one of default, llama3, mistral, qwen",
    ):
        get_template("chatml", smol_tokenizer, tool_format="glm4")
