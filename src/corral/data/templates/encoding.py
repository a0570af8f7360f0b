"""Rendering a conversation with a template, and encoding it for inference or training.

Rendered text is tokenized with `add_special_tokens=False` (templates write the BOS token
themselves where the family has one), and the BOS and EOS tokens a template writes become their
ids directly, the text between them tokenized piece by piece, as Meta's `chat_completion` and
LLaMA-Factory encode them. Tokenizing the whole text at once differs only for SentencePiece
tokenizers with `legacy=False`, which glue the text after a special token to it ("<s>[INST]"
gives "[" instead of "▁["). Training and inference share this path, so the ids a model is
trained on are the ids it is later prompted with.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.data.templates.base import Template
from corral.data.templates.families import template_names
from corral.data.templates.tools import (
    chat_messages,
    chat_tools,
    check_can_render_tools,
    uses_tools,
)
from corral.utils.errors import CorralError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
            Tool calls may be a record's `function_call` turns or OpenAI `tool_calls`
            (`chat_messages` gives the templates one shape).
        add_generation_prompt: end with the header that starts the assistant's next reply.
        tools: tool definitions (a list, or its JSON text), passed to the template as
            `chat_tools` shapes them.
        system: the system prompt used when `messages` has none; defaults to the template's.

    Raises:
        CorralError: the template cannot render this conversation (e.g. a role it has no
            place for, or tools on a template without a tool format), or `tools` or a tool call
            is not valid JSON.
    """
    from jinja2 import TemplateError

    conversation = _with_system(messages, template.default_system if system is None else system)
    if not conversation:
        return ""  # apply_chat_template refuses an empty conversation
    conversation, tools = chat_messages(conversation), chat_tools(tools)
    if uses_tools(conversation, tools):
        check_can_render_tools(template)
    try:
        return tokenizer.apply_chat_template(
            conversation,
            chat_template=template.jinja,
            tools=tools,
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

    The rendered text (with the generation prompt) is tokenized by `tokenize`, without adding
    special tokens: the template writes them. Arguments are as for `render`.
    """
    text = render(
        template, tokenizer, messages, add_generation_prompt=True, tools=tools, system=system
    )
    return tokenize(tokenizer, text)[0]


def encode_turns(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None = None,
    system: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """The conversation's ids for training, as one (prompt_ids, response_ids) pair per reply.

    Concatenating all pairs gives exactly the ids of the whole rendered conversation (as
    `tokenize` gives them, and `encode_prompt` before each reply).
    A reply's response_ids hold its content and whatever the template writes after it up to the
    next turn (the end-of-turn or eos token, so the model learns to stop); tokens after the last
    reply belong to the last response. A token straddling a prompt/reply boundary belongs to the
    prompt. A conversation without assistant messages gives []. Arguments are as for `render`.

    Raises:
        CorralError: the tokenizer is not a fast one (offsets are needed), or the template is
            not prefix-stable (rendering the first turns is not a prefix of rendering them all).
    """
    encoded = _encode_spans(template, tokenizer, messages, tools=tools, system=system)
    return [
        (encoded.ids[done:first], encoded.ids[first:stop])
        for done, first, stop in encoded.token_bounds()
    ]


# Stands for the user's text when probing what a template writes after it; the private-use
# characters survive `trim` and never occur in real text.
_PROBE = "\ue000corral\ue000"


def last_prompt_layout(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None = None,
    system: str | None = None,
) -> tuple[int, int]:
    """Where the user's text lies in the last reply's prompt ids (as `encode_turns` gives them).

    Truncation keeps the start of the user's text and what surrounds it: before it, the
    template's opening, the system prompt and the user header; after it, the header that starts
    the reply (e.g. "<|im_end|>\n<|im_start|>assistant\n"). Arguments are as for `render`.

    Returns:
        (start, end): prompt_ids[:start] comes before the text of the last user message,
        prompt_ids[end:] is what the template writes after it. When the text cannot be found
        in the rendering, start is 0; when the header cannot, end is len(prompt_ids).
    """
    encoded = _encode_spans(template, tokenizer, messages, tools=tools, system=system)
    if not encoded.spans:
        return 0, 0
    done, first, _ = encoded.token_bounds()[-1]
    prompt_start = encoded.spans[-2][1] if len(encoded.spans) > 1 else 0
    reply_start = encoded.spans[-1][0]
    # the text a reply answers: the user's, or a tool's result
    asked = [m for m in messages if m["role"] in ("user", "tool")]
    needle = asked[-1]["content"].strip().split("\n", 1)[0] if asked else ""
    text_at = encoded.text.find(needle, prompt_start, reply_start) if needle else -1
    probe = render(
        template,
        tokenizer,
        [{"role": "user", "content": _PROBE}],
        add_generation_prompt=True,
        tools=tools,
        system=system,
    )
    header = probe[probe.rfind(_PROBE) + len(_PROBE) :] if _PROBE in probe else ""
    header_at = reply_start - len(header)
    if not encoded.text.startswith(header, header_at) or header_at < max(text_at, prompt_start):
        header_at = reply_start
    start = max(bisect_left(encoded.starts, text_at), done) if text_at >= 0 else done
    # The token holding the header's first character, so a merged token keeps the header whole.
    holder = bisect_right(encoded.starts, header_at) - 1
    end = bisect_left(encoded.starts, encoded.starts[holder]) if holder >= 0 else 0
    end = first if header_at == reply_start else end
    end = min(max(end, start, done), first)
    return min(start, end) - done, end - done


@dataclass
class _Encoded:
    """A rendered conversation, its ids, where each token starts and each reply's span."""

    text: str
    ids: list[int]
    starts: list[int]
    spans: list[tuple[int, int]]

    def token_bounds(self) -> list[tuple[int, int, int]]:
        """Per reply: (first prompt token, first reply token, end of the reply) as ids indices.

        A token straddling a prompt/reply boundary belongs to the prompt; tokens after the last
        reply belong to it.
        """
        bounds, done = [], 0
        for k, (start, end) in enumerate(self.spans):
            first = bisect_left(self.starts, start)  # first token starting inside the reply
            stop = bisect_left(self.starts, end) if k + 1 < len(self.spans) else len(self.ids)
            bounds.append((done, first, stop))
            done = stop
        return bounds


def _encode_spans(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    tools: list[dict] | str | None,
    system: str | None,
) -> _Encoded:
    if not getattr(tokenizer, "is_fast", False):
        raise CorralError(
            f"training with a chat template needs a fast tokenizer (one with tokenizer.json); "
            f"{type(tokenizer).__name__} cannot map tokens back to the text"
        )
    full, spans = _reply_spans(template, tokenizer, messages, tools=tools, system=system)
    ids, starts = tokenize(tokenizer, full, starts=True)
    encoded = _Encoded(full, ids, starts, spans)
    _check_prompts_tokenize_alike(template, encoded, tokenizer)
    return encoded


def _check_prompts_tokenize_alike(
    template: Template, encoded: _Encoded, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Before each reply, training must see the ids `encode_prompt` prompts the model with.

    They differ when the tokenizer splits the end of the template's generation prompt one way
    alone and another way with the reply after it (Llama 3's "\n\n" header end on a GPT-2
    style tokenizer gives "\n\n" alone but "\n", "\n" before a word). Only a token straddling
    the reply's start may differ (it belongs to the prompt, see `token_bounds`).
    """
    bounds = zip(encoded.spans, encoded.token_bounds(), strict=True)
    for k, ((start, _), (_, first, _)) in enumerate(bounds):
        alone, trained = tokenize(tokenizer, encoded.text[:start])[0], encoded.ids[:first]
        if alone == trained or (len(alone) == len(trained) and alone[:-1] == trained[:-1]):
            continue
        raise CorralError(
            f"the '{template.name}' chat template does not suit this tokenizer: the prompt "
            f"before reply {k + 1} tokenizes differently alone ({len(alone)} ids) than followed "
            f"by the reply ({len(trained)} ids), so the model would be trained on other ids "
            "than it is prompted with; use the template the model was made for (e.g. leave "
            f"template empty for the tokenizer's own), one of: {', '.join(template_names())}"
        )


def tokenize(
    tokenizer: PreTrainedTokenizerBase, text: str, *, starts: bool = False
) -> tuple[list[int], list[int]]:
    """Rendered text as ids, the BOS/EOS tokens written in it inserted as ids.

    The text between those tokens is tokenized piece by piece without special tokens, so each
    piece starts as the tokenizer starts a text (SentencePiece's "▁" prefix included, whatever
    its `legacy` setting), as Meta's reference encoding and LLaMA-Factory do.

    Args:
        tokenizer: the model's tokenizer (fast, when `starts` is asked for).
        text: what `render` returned.
        starts: also return where each token starts in `text` (never decreasing).

    Returns:
        The ids, and the start offsets (empty unless `starts`).
    """
    specials = _bos_eos(tokenizer)
    parts = re.split(f"({'|'.join(map(re.escape, specials))})", text) if specials else [text]
    pieces = [p for k, p in enumerate(parts) if k % 2 == 0 and p]
    encoded = (
        tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=starts)
        if pieces
        else {"input_ids": [], "offset_mapping": []}
    )
    ids: list[int] = []
    offsets: list[int] = []
    position, piece = 0, 0
    for k, part in enumerate(parts):
        if k % 2:
            ids.append(specials[part])
            offsets.append(position)
        elif part:
            ids += encoded["input_ids"][piece]
            if starts:
                offsets += [position + s for s in _token_starts(encoded["offset_mapping"][piece])]
            piece += 1
        position += len(part)
    return ids, offsets


def prefix_every_piece(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a SentencePiece tokenizer prefix "▁" to every text piece, as `tokenize` does.

    A `legacy=False` tokenizer prefixes only the start of a text, so its own
    `apply_chat_template` would give "<s>", "[" where training gave Meta's "<s>", "▁[". Called
    on the tokenizer a run saves, so its chat template, exports and plain transformers give the
    ids it was trained on; export calls it again before saving. Other tokenizers are left as
    they are.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    scheme = getattr(pre, "prepend_scheme", None)
    if scheme not in ("first", "always"):
        return
    if scheme == "first":
        pre.prepend_scheme = "always"
        backend.pre_tokenizer = pre  # the backend holds a copy
    # transformers rebuilds the pre-tokenizer from `legacy` when the tokenizer is loaded again,
    # and does not keep a loaded `legacy` for the next save
    tokenizer.init_kwargs["legacy"] = True
    if hasattr(tokenizer, "legacy"):
        tokenizer.legacy = True


def _bos_eos(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The BOS and EOS tokens' text -> id, longest first (for the split pattern)."""
    found = {}
    for token, token_id in (
        (tokenizer.bos_token, tokenizer.bos_token_id),
        (tokenizer.eos_token, tokenizer.eos_token_id),
    ):
        if token and token_id is not None:
            found[token] = token_id
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


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
    messages = chat_messages(messages)  # a record's function_call turns become assistant replies
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
