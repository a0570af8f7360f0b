"""The named chat templates, each the published format of a model family, written as Jinja.

Each is prefix-stable (rendering the first turns gives a prefix of rendering them all), which
`encode_turns` needs to find the replies. bos/eos fall back to "" for tokenizers without one.
Templates with a `tool_format` write tools with the pieces in `tool_jinja`.
"""

from __future__ import annotations

import json

from corral.data.templates import tool_jinja
from corral.data.templates.base import EOS, Template

_TOKENS = """\
{%- set bos = bos_token or '' %}
{%- set eos = eos_token or '' %}
"""


def _split_system(default: str | None = None) -> str:
    """Jinja that sets `system` (the first message's content, else `default`) and `turns`."""
    fallback = "none" if default is None else json.dumps(default)
    return f"""\
{{%- if messages and messages[0]['role'] == 'system' %}}
    {{%- set system = messages[0]['content'] %}}
    {{%- set turns = messages[1:] %}}
{{%- else %}}
    {{%- set system = {fallback} %}}
    {{%- set turns = messages %}}
{{%- endif %}}
"""


def _unknown_role(name: str) -> str:
    return (
        "    {%- else %}\n"
        f"        {{{{- raise_exception('the {name} template has no place for a ' + "
        "message['role'] + ' message') }}\n"
        "    {%- endif %}\n"
    )


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_INPUT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Stanford Alpaca. The Alpaca reader keeps "instruction" and "input" on the user message; the
# preamble follows the first user turn only, so rendering stays prefix-stable.
_ALPACA = (
    _TOKENS
    + _split_system()
    + f"""\
{{%- if system is none %}}
    {{%- if turns and turns[0]['input'] is defined and turns[0]['input'] %}}
        {{%- set system = {json.dumps(ALPACA_INPUT_SYSTEM)} %}}
    {{%- else %}}
        {{%- set system = {json.dumps(ALPACA_SYSTEM)} %}}
    {{%- endif %}}
{{%- endif %}}
{{%- if system %}}
    {{{{- system + '\\n\\n' }}}}
{{%- endif %}}
"""
    + r"""{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {%- if not loop.first %}
            {{- '\n\n' }}
        {%- endif %}
        {%- if message['instruction'] is defined %}
            {{- '### Instruction:\n' + message['instruction'] }}
            {%- if message['input'] is defined and message['input'] %}
                {{- '\n\n### Input:\n' + message['input'] }}
            {%- endif %}
        {%- else %}
            {{- '### Instruction:\n' + message['content'] }}
        {%- endif %}
        {{- '\n\n### Response:\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos }}
"""
    + _unknown_role("alpaca")
    + "{%- endfor %}\n"
)

# FastChat's vicuna_v1.1 (sep " ", sep2 "</s>"). FastChat's tokenizer call adds <s>; we write it.
_VICUNA = (
    _TOKENS
    + _split_system(VICUNA_SYSTEM)
    + r"""{{- bos }}
{%- if system %}
    {{- system + ' ' }}
{%- endif %}
{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {{- 'USER: ' + message['content'] + ' ' }}
    {%- elif message['role'] == 'assistant' %}
        {{- 'ASSISTANT: ' + message['content'] + eos }}
"""
    + _unknown_role("vicuna")
    + r"""{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}
"""
)

# Meta's Llama 2 chat format (llama/generation.py: chat_completion), contents stripped as there.
_LLAMA2 = (
    _TOKENS
    + _split_system()
    + r"""{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {%- set content = message['content'] | trim %}
        {%- if loop.first and system %}
            {%- set content = '<<SYS>>\n' + system | trim + '\n<</SYS>>\n\n' + content %}
        {%- endif %}
        {{- bos + '[INST] ' + content + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + ' ' + eos }}
"""
    + _unknown_role("llama2")
    + "{%- endfor %}\n"
)

# Mistral-7B-Instruct v0.2; the system prompt goes before the first user message. Tools as
# v0.3 writes them.
_MISTRAL = (
    _TOKENS
    + _split_system()
    + "{{- bos }}\n"
    + tool_jinja.MISTRAL_TOOLS_HEAD
    + r"""{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system %}
            {{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
"""
    + tool_jinja.MISTRAL_TOOL_MESSAGES
    + r"""    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos }}
"""
    + _unknown_role("mistral")
    + "{%- endfor %}\n"
)

# Meta Llama 3 Instruct; bos_token is <|begin_of_text|> in Llama 3 tokenizers. With tools,
# Llama 3.1's format.
_LLAMA3 = (
    _TOKENS
    + "{{- bos }}\n"
    + tool_jinja.LLAMA3_TOOLS_HEAD
    + "{%- for message in messages %}\n"
    + tool_jinja.LLAMA3_TOOL_MESSAGES
    + r"""        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
)

# ChatML, with Qwen2.5's tool format.
_CHATML = tool_jinja.chatml_with_tools(default_system=None)

# Qwen2.5 Instruct: ChatML with a default system prompt, exactly Qwen2.5's published template.
_QWEN = tool_jinja.chatml_with_tools(default_system=QWEN_SYSTEM)

# LLaMA-Factory's "default" (0.9.5): "System: {system}{eos}\n", "Human: {user}{eos}\nAssistant:",
# "{reply}{eos}\n"; tools described after the system prompt, tool results as user turns.
_DEFAULT = (
    _TOKENS
    + _split_system()
    + r"""{%- if tools %}
"""
    + tool_jinja.DEFAULT_TOOL_TEXT
    + r"""    {%- set system = (system or '') + tool_text %}
{%- endif %}
{%- if system %}
    {{- 'System: ' + system + eos + '\n' }}
{%- endif %}
{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {{- 'Human: ' + message['content'] + eos + '\nAssistant:' }}
"""
    + tool_jinja.DEFAULT_TOOL_MESSAGES
    + r"""    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos + '\n' }}
"""
    + _unknown_role("default")
    + "{%- endfor %}\n"
)

# Raw text: the contents one after another, each reply followed by eos.
_EMPTY = (
    _TOKENS
    + r"""{%- for message in messages %}
    {{- message['content'] }}
    {%- if message['role'] == 'assistant' %}
        {{- eos }}
    {%- endif %}
{%- endfor %}
"""
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("alpaca", _ALPACA, (EOS,)),
        Template("chatml", _CHATML, ("<|im_end|>",), tool_format="qwen"),
        Template("default", _DEFAULT, (EOS,), tool_format="default"),
        Template("empty", _EMPTY, (EOS,)),
        Template("llama2", _LLAMA2, (EOS,)),
        Template("llama3", _LLAMA3, ("<|eot_id|>",), tool_format="llama3"),
        Template("mistral", _MISTRAL, (EOS,), tool_format="mistral"),
        Template("qwen", _QWEN, ("<|im_end|>",), QWEN_SYSTEM, tool_format="qwen"),
        Template("vicuna", _VICUNA, (EOS,), default_system=VICUNA_SYSTEM),
    )
}


def template_names() -> list[str]:
    """The named templates, sorted (the tokenizer's own is chosen with None or "tokenizer")."""
    return sorted(TEMPLATES)
