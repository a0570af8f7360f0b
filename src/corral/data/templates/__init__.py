"""Chat templates: the exact text, and token ids, a model sees for a conversation.

Every template is a Hugging Face chat template (Jinja), so one rendering path serves training,
chat, the API server and export (which writes the Jinja into the tokenizer and the GGUF file).
The named templates are written in `families`; "tokenizer" (or no name) is the tokenizer's
own `chat_template`.

    template = get_template("llama3", tokenizer)
    ids = encode_prompt(template, tokenizer, [{"role": "user", "content": "Hi"}])
    pairs = encode_turns(template, tokenizer, conversation)  # [(prompt_ids, response_ids), ...]
    model.generate(..., eos_token_id=stop_token_ids(template, tokenizer))

Tool calling (`tools`): `chat_messages` gives templates one shape of tool calls (a record's
`function_call` turns, OpenAI `tool_calls`), `parse_reply` splits a generated reply into text
and `ToolCall`s, `call_prefix` is the text that starts a call in the template's `tool_format`.

The package: `base` (the `Template` record), `families` (the named templates), `tool_jinja`
(their tool pieces), `encoding` (render, encode_prompt, encode_turns), `choose` (get_template,
stop words), `tools` (tool formats).
"""

from corral.data.templates.base import EOS, TOKENIZER_TEMPLATE, Template
from corral.data.templates.choose import (
    get_template,
    stop_strings,
    stop_token_ids,
)
from corral.data.templates.encoding import (
    encode_prompt,
    encode_turns,
    last_prompt_layout,
    prefix_every_piece,
    render,
    tokenize,
)
from corral.data.templates.families import (
    ALPACA_INPUT_SYSTEM,
    ALPACA_SYSTEM,
    QWEN_SYSTEM,
    VICUNA_SYSTEM,
    template_names,
)
from corral.data.templates.tools import (
    TOOL_FORMATS,
    ToolCall,
    call_prefix,
    chat_messages,
    chat_tools,
    parse_reply,
)

__all__ = [
    "ALPACA_INPUT_SYSTEM",
    "ALPACA_SYSTEM",
    "EOS",
    "QWEN_SYSTEM",
    "TOKENIZER_TEMPLATE",
    "TOOL_FORMATS",
    "VICUNA_SYSTEM",
    "Template",
    "ToolCall",
    "call_prefix",
    "chat_messages",
    "chat_tools",
    "encode_prompt",
    "encode_turns",
    "get_template",
    "last_prompt_layout",
    "parse_reply",
    "prefix_every_piece",
    "render",
    "stop_strings",
    "stop_token_ids",
    "template_names",
    "tokenize",
]
