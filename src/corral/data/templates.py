"""Chat templates: the exact text, and token ids, a model sees for a conversation.

Every template is a Hugging Face chat template (Jinja), so one rendering path serves training,
chat, the API server and export (which writes the Jinja into the tokenizer and the GGUF file).
The named templates below are written in this module; "tokenizer" (or no name) is the
tokenizer's own `chat_template`.

    template = get_template("llama3", tokenizer)
    ids = encode_prompt(template, tokenizer, [{"role": "user", "content": "Hi"}])
    pairs = encode_turns(template, tokenizer, conversation)  # [(prompt_ids, response_ids), ...]
    model.generate(..., eos_token_id=stop_token_ids(template, tokenizer))

Rendered text is always tokenized whole with `add_special_tokens=False` (templates write the
BOS token themselves where the family has one), as llama.cpp, vLLM and `apply_chat_template`
do, so the ids a model is trained on are the ids it is later served with.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from corral.utils.errors import CorralError
from corral.utils.suggest import did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_TEMPLATE = "tokenizer"
EOS = "{eos}"  # in stop words: the tokenizer's eos token


@dataclass(frozen=True)
class Template:
    """A chat template and the words that end an assistant reply.

    Attributes:
        name: e.g. "chatml", or "tokenizer" for the tokenizer's own chat template.
        jinja: the Hugging Face chat template, rendered by `tokenizer.apply_chat_template`.
        stop_words: strings that end an assistant reply; "{eos}" stands for the tokenizer's
            eos token (`get_template` returns them resolved).
        default_system: the system prompt used when a conversation has none. Named templates
            also write it into `jinja`, so an exported template behaves the same without corral.
    """

    name: str
    jinja: str
    stop_words: tuple[str, ...]
    default_system: str | None = None


# --- The named templates -------------------------------------------------------------------
# Each is prefix-stable (rendering the first turns gives a prefix of rendering them all), which
# `encode_turns` needs to find the replies. bos/eos fall back to "" for tokenizers without one.

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

# Mistral-7B-Instruct v0.2; the system prompt goes before the first user message.
_MISTRAL = (
    _TOKENS
    + _split_system()
    + r"""{{- bos }}
{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system %}
            {{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos }}
"""
    + _unknown_role("mistral")
    + "{%- endfor %}\n"
)

# Meta Llama 3 Instruct; bos_token is <|begin_of_text|> in Llama 3 tokenizers.
_LLAMA3 = (
    _TOKENS
    + r"""{{- bos }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
)

_CHATML = r"""{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen2.5 Instruct: ChatML with a default system prompt.
_QWEN = (
    f"""\
{{%- if not messages or messages[0]['role'] != 'system' %}}
    {{{{- '<|im_start|>system\\n' + {json.dumps(QWEN_SYSTEM)} + '<|im_end|>\\n' }}}}
{{%- endif %}}
"""
    + _CHATML
)

# LLaMA-Factory's "default": "{system}\n", "Human: {user}\nAssistant:", "{reply}{eos}\n".
_DEFAULT = (
    _TOKENS
    + _split_system()
    + r"""{%- if system %}
    {{- system + '\n' }}
{%- endif %}
{%- for message in turns %}
    {%- if message['role'] == 'user' %}
        {{- 'Human: ' + message['content'] + '\nAssistant:' }}
    {%- elif message['role'] == 'assistant' %}
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

_TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("alpaca", _ALPACA, (EOS,)),
        Template("chatml", _CHATML, ("<|im_end|>",)),
        Template("default", _DEFAULT, (EOS,)),
        Template("empty", _EMPTY, (EOS,)),
        Template("llama2", _LLAMA2, (EOS,)),
        Template("llama3", _LLAMA3, ("<|eot_id|>",)),
        Template("mistral", _MISTRAL, (EOS,)),
        Template("qwen", _QWEN, ("<|im_end|>",), default_system=QWEN_SYSTEM),
        Template("vicuna", _VICUNA, (EOS,), default_system=VICUNA_SYSTEM),
    )
}


# --- Choosing a template ---------------------------------------------------------------------


def template_names() -> list[str]:
    """The named templates, sorted (the tokenizer's own is chosen with None or "tokenizer")."""
    return sorted(_TEMPLATES)


def get_template(name: str | None, tokenizer: PreTrainedTokenizerBase) -> Template:
    """The template called `name`, with its stop words resolved for `tokenizer`.

    Args:
        name: a name from `template_names()`, or None / "tokenizer" for the tokenizer's own
            chat template.
        tokenizer: the model's tokenizer (supplies the eos token and, for "tokenizer", the
            template itself).

    Raises:
        CorralError: the name is unknown, or the tokenizer has no chat template of its own.
    """
    if name is None or name == TOKENIZER_TEMPLATE:
        return _tokenizer_template(tokenizer)
    if name not in _TEMPLATES:
        raise CorralError(
            f"unknown chat template '{name}'{did_you_mean(name, _TEMPLATES)}; set template to one "
            f"of: {', '.join(template_names())}, or leave it empty to use the tokenizer's own "
            "chat template"
        )
    template = _TEMPLATES[name]
    return replace(template, stop_words=_resolve_stop_words(template.stop_words, tokenizer))


def _tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> Template:
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):  # tokenizers may carry several named templates
        jinja = jinja.get("default")
    if not jinja:
        raise CorralError(
            "this tokenizer has no chat template of its own, so the template must be named: "
            f"set template to one of: {', '.join(template_names())} (e.g. template=chatml)"
        )
    end_of_turn = _end_of_turn_token(Template(TOKENIZER_TEMPLATE, jinja, ()), tokenizer)
    return Template(TOKENIZER_TEMPLATE, jinja, _resolve_stop_words(end_of_turn, tokenizer))


def _end_of_turn_token(template: Template, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The first special token the template writes after a reply (e.g. "<|im_end|>"), if any."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "XYZ"}]
    try:
        full, [(start, end)] = _reply_spans(template, tokenizer, probe, tools=None, system=None)
    except CorralError:  # a template we cannot probe still stops on eos
        return []
    reply = full[start:end]
    after = reply[reply.index("XYZ") + 3 :] if "XYZ" in reply else ""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for token_id in tokenizer.encode(after, add_special_tokens=False):
        if token_id in special:
            return [tokenizer.convert_ids_to_tokens(token_id)]
    return []


# --- Stopping --------------------------------------------------------------------------------


def _resolve_stop_words(
    words: tuple[str, ...] | list[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, ...]:
    """`words` plus the tokenizer's eos, "{eos}" resolved, deduplicated in order."""
    eos = tokenizer.eos_token
    resolved = (eos if word == EOS else word for word in (*words, EOS))
    return tuple(dict.fromkeys(word for word in resolved if word))


def _single_token_id(word: str, tokenizer: PreTrainedTokenizerBase) -> int | None:
    ids = tokenizer.encode(word, add_special_tokens=False)
    # The token must spell the word exactly: "▁foo" or "Ġfoo" is a different token from "foo".
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == word:
        return ids[0]
    return None


def stop_token_ids(template: Template, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a reply (end-of-turn token(s) and eos), for `generate(eos_token_id=...)`.

    Only stop words that are a single token in this tokenizer; see `stop_strings` for the rest.
    """
    words = _resolve_stop_words(template.stop_words, tokenizer)
    ids = (_single_token_id(word, tokenizer) for word in words)
    return list(dict.fromkeys(i for i in ids if i is not None))


def stop_strings(template: Template, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Stop words that are not a single token in this tokenizer (for string-based stopping)."""
    words = _resolve_stop_words(template.stop_words, tokenizer)
    return [word for word in words if _single_token_id(word, tokenizer) is None]


# --- Rendering and encoding ------------------------------------------------------------------


def render(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    tools: list[dict] | str | None = None,
    system: str | None = None,
) -> str:
    """The conversation as text, exactly as the model sees it.

    Args:
        template: from `get_template`.
        tokenizer: supplies bos_token/eos_token to the template.
        messages: OpenAI-style `{"role", "content"}` dicts, a system message (if any) first.
            Extra keys are passed to the template (alpaca reads "instruction" and "input").
        add_generation_prompt: end with the header that starts the assistant's next reply.
        tools: tool definitions (a list, or its JSON text), passed to the template.
        system: the system prompt used when `messages` has none; defaults to the template's.

    Raises:
        CorralError: the template cannot render this conversation (e.g. a role it has no
            place for), or `tools` is not valid JSON.
    """
    from jinja2 import TemplateError

    conversation = _with_system(messages, template.default_system if system is None else system)
    if not conversation:
        return ""  # apply_chat_template refuses an empty conversation
    try:
        return tokenizer.apply_chat_template(
            conversation,
            chat_template=template.jinja,
            tools=_parse_tools(tools),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except TemplateError as exc:
        raise CorralError(
            f"the '{template.name}' chat template cannot render this conversation: {exc}"
        ) from exc


def encode_prompt(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None = None,
    system: str | None = None,
) -> list[int]:
    """The ids to feed the model so that it generates the next assistant reply.

    The whole rendered text (with the generation prompt) is tokenized once, without adding
    special tokens: the template writes them. Arguments are as for `render`.
    """
    text = render(
        template, tokenizer, messages, add_generation_prompt=True, tools=tools, system=system
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_turns(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None = None,
    system: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """The conversation's ids for training, as one (prompt_ids, response_ids) pair per reply.

    Concatenating all pairs gives exactly the tokenization of the whole rendered conversation.
    A reply's response_ids hold its content and whatever the template writes after it up to the
    next turn (the end-of-turn or eos token, so the model learns to stop); tokens after the last
    reply belong to the last response. A token straddling a prompt/reply boundary belongs to the
    prompt. A conversation without assistant messages gives []. Arguments are as for `render`.

    Raises:
        CorralError: the tokenizer is not a fast one (offsets are needed), or the template is
            not prefix-stable (rendering the first turns is not a prefix of rendering them all).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise CorralError(
            f"training with a chat template needs a fast tokenizer (one with tokenizer.json); "
            f"{type(tokenizer).__name__} cannot map tokens back to the text"
        )
    full, spans = _reply_spans(template, tokenizer, messages, tools=tools, system=system)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    starts = _token_starts(encoding["offset_mapping"])
    pairs, done = [], 0
    for k, (start, end) in enumerate(spans):
        first = bisect_left(starts, start)  # first token starting inside the reply
        stop = bisect_left(starts, end) if k + 1 < len(spans) else len(ids)
        pairs.append((ids[done:first], ids[first:stop]))
        done = stop
    return pairs


def _reply_spans(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None,
    system: str | None,
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendered conversation and each assistant reply's [start, end) in it.

    A reply runs from the end of the generation prompt before it to the end of the rendering
    that stops after it, so it includes what the template writes after the content.
    """
    kwargs = {"tools": tools, "system": system}
    full = render(template, tokenizer, messages, add_generation_prompt=False, **kwargs)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(template, tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
        upto = render(template, tokenizer, messages[: i + 1], add_generation_prompt=False, **kwargs)
        after_previous = not spans or spans[-1][1] <= len(prompt)
        if not (upto.startswith(prompt) and full.startswith(upto) and after_previous):
            raise CorralError(
                f"the '{template.name}' chat template is not prefix-stable: rendering the "
                f"conversation up to message {i} (an assistant reply) is not the start of "
                "rendering all of it (the template rewrites earlier turns), so it cannot be used "
                f"for training; set template to one of: {', '.join(template_names())}"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def _token_starts(offsets: list[tuple[int, int]]) -> list[int]:
    """Where each token starts in the text, never decreasing (for bisect).

    Tokenizers that trim offsets report "Ġword" as starting after its space; the space is still
    part of that token, so a token starts no later than where the previous one ended.
    """
    starts: list[int] = []
    end = 0
    for token_start, token_end in offsets:
        starts.append(max(min(token_start, end), starts[-1] if starts else 0))
        end = max(end, token_end)
    return starts


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def _parse_tools(tools: list[dict] | str | None) -> Any:
    if not isinstance(tools, str):
        return tools
    try:
        return json.loads(tools)
    except json.JSONDecodeError as exc:
        raise CorralError(f"tools is not valid JSON ({exc}): {tools[:80]!r}") from exc
