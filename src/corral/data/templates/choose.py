"""Choosing a template by name (or the tokenizer's own), and the ids and strings that stop a
reply."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from corral.data.templates.base import EOS, TOKENIZER_TEMPLATE, Template
from corral.data.templates.encoding import _reply_spans
from corral.data.templates.families import TEMPLATES, template_names
from corral.data.templates.tools import check_tool_format, detect_tool_format
from corral.utils.errors import CorralError
from corral.utils.suggest import did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def get_template(
    name: str | None, tokenizer: PreTrainedTokenizerBase, *, tool_format: str | None = None
) -> Template:
    """The template called `name`, with its stop words resolved for `tokenizer`.

    Args:
        name: a name from `template_names()`, or None / "tokenizer" for the tokenizer's own
            chat template.
        tokenizer: the model's tokenizer (supplies the eos token and, for "tokenizer", the
            template itself).
        tool_format: LLaMA-Factory's `tool_format` key, if set: it must be the format the
            template writes tools in.

    Raises:
        CorralError: the name is unknown, the tokenizer has no chat template of its own, or
            `tool_format` is not the template's.
    """
    template = _named_template(name, tokenizer)
    check_tool_format(template, tool_format)
    return template


def check_template_name(name: str | None) -> None:
    """Raise the CorralError `get_template` would for an unknown name (no tokenizer needed)."""
    if name is not None and name != TOKENIZER_TEMPLATE and name not in TEMPLATES:
        raise CorralError(
            f"unknown chat template '{name}'{did_you_mean(name, TEMPLATES)}; set template to one "
            f"of: {', '.join(template_names())}, or leave it empty to use the tokenizer's own "
            "chat template"
        )


def _named_template(name: str | None, tokenizer: PreTrainedTokenizerBase) -> Template:
    if name is None or name == TOKENIZER_TEMPLATE:
        return _tokenizer_template(tokenizer)
    check_template_name(name)
    template = TEMPLATES[name]
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
    stop_words = _resolve_stop_words(end_of_turn, tokenizer)
    return Template(TOKENIZER_TEMPLATE, jinja, stop_words, tool_format=detect_tool_format(jinja))


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
