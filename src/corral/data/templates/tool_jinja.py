"""The Jinja that writes tools, tool calls and tool results, per tool format (see `tools`).

`families` builds its templates from these pieces. Each keeps the template prefix-stable: tool
definitions go where the conversation starts (the system part, or the first user message for
Llama 3.1), so rendering the first turns is still a prefix of rendering them all. Messages
arrive as `tools.chat_messages` shapes them: a call is an assistant message with
`tool_calls: [{"type": "function", "function": {"name", "arguments": object}}]`.
"""

from __future__ import annotations

import json

# Qwen2.5-Instruct's tool prompt, as its published chat template writes it.
_QWEN_TOOLS_INTRO = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def chatml_with_tools(default_system: str | None) -> str:
    """ChatML with Qwen2.5's tool format; `default_system` is written when a conversation has
    no system message (None: no system block then, unless there are tools, whose block then
    starts empty, as Qwen's template renders an empty system prompt)."""
    fallback = json.dumps(default_system or "")
    no_system = (
        f"{{%- else %}}\n    {{{{- '<|im_start|>system\\n' + {fallback} + '<|im_end|>\\n' }}}}\n"
        if default_system is not None
        else ""
    )
    return (
        f"""\
{{%- if tools %}}
    {{{{- '<|im_start|>system\\n' }}}}
    {{%- if messages[0]['role'] == 'system' %}}
        {{{{- messages[0]['content'] }}}}
    {{%- else %}}
        {{{{- {fallback} }}}}
    {{%- endif %}}
    {{{{- {json.dumps(_QWEN_TOOLS_INTRO)} }}}}
    {{%- for tool in tools %}}
        {{{{- '\\n' + tool | tojson }}}}
    {{%- endfor %}}
    {{{{- {json.dumps(_QWEN_TOOLS_OUTRO)} }}}}
{{%- elif messages[0]['role'] == 'system' %}}
    {{{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}}}
{no_system}{{%- endif %}}
"""
        + r"""{%- for message in messages %}
    {%- if message['role'] == 'system' and loop.first %}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}
            {{- '\n' + message['content'] }}
        {%- endif %}
        {%- for call in message['tool_calls'] %}
            {{- '\n<tool_call>\n{"name": "' + call['function']['name'] + '", "arguments": ' }}
            {{- call['function']['arguments'] | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
    )


# Llama 3.1 Instruct with tools (its template's defaults: definitions in the first user
# message, the date it was published). Without tools corral's llama3 stays Llama 3's format.
_LLAMA31_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
_LLAMA31_TOOLS_INTRO = (
    "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond "
    "with a JSON for a function call with its proper arguments that best answers the given "
    'prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)

LLAMA3_TOOLS_HEAD = f"""\
{{%- if tools %}}
    {{%- if messages[0]['role'] == 'system' %}}
        {{%- set system = messages[0]['content'] | trim %}}
        {{%- set messages = messages[1:] %}}
    {{%- else %}}
        {{%- set system = '' %}}
    {{%- endif %}}
    {{{{- {json.dumps(_LLAMA31_SYSTEM)} + system + '<|eot_id|>' }}}}
    {{%- if not messages or messages[0]['role'] != 'user' %}}
        {{{{- raise_exception('the llama3 template writes tools into the first user message, '
            + 'and the conversation does not start with one') }}}}
    {{%- endif %}}
    {{{{- {json.dumps(_LLAMA31_TOOLS_INTRO)} }}}}
    {{%- for tool in tools %}}
        {{{{- tool | tojson(indent=4) + '\\n\\n' }}}}
    {{%- endfor %}}
    {{{{- messages[0]['content'] | trim + '<|eot_id|>' }}}}
    {{%- set messages = messages[1:] %}}
{{%- endif %}}
"""

# Inside the message loop, before the plain-message branch. Llama 3.1 writes a tool's result as
# JSON text (its template applies tojson to strings too).
LLAMA3_TOOL_MESSAGES = r"""    {%- if message['tool_calls'] %}
        {%- if message['tool_calls'] | length != 1 %}
            {{- raise_exception('Llama 3.1 makes one tool call per reply; this reply has '
                + message['tool_calls'] | length | string) }}
        {%- endif %}
        {%- set call = message['tool_calls'][0]['function'] %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + call['name'] }}
        {{- '", "parameters": ' + call['arguments'] | tojson + '}<|eot_id|>' }}
    {%- elif message['role'] == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] | tojson }}
        {{- '<|eot_id|>' }}
    {%- else %}
"""

# Mistral v0.3's markers, placed where the conversation starts (v0.3's own template writes the
# definitions before the last user message, which no prefix-stable template can).
MISTRAL_TOOLS_HEAD = r"""{%- if tools %}
    {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
{%- endif %}
"""

MISTRAL_TOOL_MESSAGES = r"""    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {%- set ns = namespace(calls=[]) %}
        {%- for call in message['tool_calls'] %}
            {%- set function = call['function'] %}
            {%- set ns.calls = ns.calls
                + [{'name': function['name'], 'arguments': function['arguments']}] %}
        {%- endfor %}
        {{- '[TOOL_CALLS] ' + ns.calls | tojson + eos }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS] ' + {'content': message['content']} | tojson + '[/TOOL_RESULTS]' }}
"""

# LLaMA-Factory's "default" tool format (DefaultToolUtils): the definitions described in text
# after the system prompt, as `tool_text`.
DEFAULT_TOOL_TEXT = r"""{%- set ns = namespace(text='', names=[]) %}
{%- for tool in tools %}
    {%- set function = tool['function'] %}
    {%- set ns.text = ns.text + '> Tool Name: ' + function['name'] + '\nTool Description: '
        + (function['description'] or '') + '\nTool Args:\n' %}
    {%- set parameters = function['parameters'] or {} %}
    {%- for name, param in (parameters['properties'] or {}).items() %}
        {%- set required = ', required' if name in (parameters['required'] or []) else '' %}
        {%- set enum = ', should be one of [' + param['enum'] | join(', ') + ']'
            if param['enum'] else '' %}
        {#- 'items' in param: param['items'] alone would find the dict's items method #}
        {%- set each = ', where each item should be ' + (param['items']['type'] or '')
            if 'items' in param and param['items'] else '' %}
        {%- set ns.text = ns.text + '  - ' + name + ' (' + (param['type'] or '') + required
            + '): ' + (param['description'] or '') + enum + each + '\n' %}
    {%- endfor %}
    {%- set ns.text = ns.text + '\n' %}
    {%- set ns.names = ns.names + [function['name']] %}
{%- endfor %}
{%- set tool_text = 'You have access to the following tools:\n' + ns.text
    + 'Use the following format if using a tool:\n```\nAction: tool name (one of ['
    + ns.names | join(', ') + '])\nAction Input: the input to the tool, in a JSON format '
    + 'representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n' %}
"""

DEFAULT_TOOL_MESSAGES = r"""    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {%- for call in message['tool_calls'] %}
            {%- if not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- 'Action: ' + call['function']['name'] + '\nAction Input: ' }}
            {{- call['function']['arguments'] | tojson }}
        {%- endfor %}
        {{- eos + '\n' }}
    {%- elif message['role'] == 'tool' %}
        {{- 'Human: ' + message['content'] + eos + '\nAssistant:' }}
"""
