"""New tokens in a model: `new_special_tokens`, `resize_vocab`, and the rows `corral vocab
extend` adds, each new embedding (and LM head) row started from the old rows it is made of.

    tokenizer.add_special_tokens(...)                 # or an adapter folder's saved tokenizer
    fit_embeddings(model, tokenizer)                  # one row per token, new rows = sub-token means

A new token's row starts as the mean of the rows of the old tokens its text splits into under
the old tokenizer: near what its spelling meant, far closer than a random row (continued
training still has to teach the model to predict it; benchmarks/vocab.py measures the gap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.utils.errors import ModelError
from corral.utils.log import get_logger

# the largest vocabulary corral writes: Gemma's 256k; beyond it embeddings dominate the model
MAX_VOCAB = 262_144


@dataclass
class NewTokens:
    """Tokens appended to a vocabulary: their strings, ids and the old ids each one joins."""

    tokens: list[str]
    ids: list[int]
    parts: list[list[int]]


def add_new_special_tokens(tokenizer: Any, tokens: list[str]) -> list[str]:
    """Add `tokens` to `tokenizer` as special tokens (never split, kept by decode); returns those
    that were new. Tokens already in the vocabulary are marked special but not added twice.

    Raises:
        ModelError: naming new_special_tokens, when the vocabulary would exceed MAX_VOCAB.
    """
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    added = [t for t in tokens if t not in vocab]
    if len(tokenizer) + len(added) > MAX_VOCAB:
        raise ModelError(
            f"new_special_tokens: {len(added):,} new tokens would make "
            f"{len(tokenizer) + len(added):,}; corral grows a vocabulary up to {MAX_VOCAB:,}"
        )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": tokens}, replace_extra_special_tokens=False
    )
    log = get_logger()
    if present:
        log.info(f"new_special_tokens: already in the vocabulary, not added: {', '.join(present)}")
    if added:
        log.info(f"new_special_tokens: added {', '.join(added)} (ids from {len(vocab)})")
    return added


def fit_embeddings(model: Any, tokenizer: Any) -> NewTokens:
    """Give `model` one embedding (and LM head) row per token of `tokenizer`, when it has fewer.

    Each new token's text is split with its special tokens split (`<think>` -> `<`, `think`,
    `>`), and its rows start as the mean of those old tokens' rows (the mean of all old rows
    for a token made only of new ones). The model never shrinks.

    Returns:
        The new tokens (empty when the model already had enough rows).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    ids = list(range(rows, len(tokenizer)))
    texts = [tokenizer.decode([i]) for i in ids]
    parts = [
        [
            p
            for p in tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True)
            if p < rows
        ]
        for t in texts
    ]
    new = NewTokens(texts, ids, parts)
    if ids:
        grow_embeddings(model, new)
        get_logger().info(f"embeddings resized from {rows:,} to {len(tokenizer):,} rows")
    return new


def grow_embeddings(model: Any, new: NewTokens) -> None:
    """Resize the input (and untied output) embeddings for `new`; each new row is the mean of
    the old rows of the tokens it joins, so its logit and meaning start where the old ones were
    (a token with no old parts starts at the mean of every old row, LLaMA-Factory's rule)."""
    import torch

    if not new.ids:
        return
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows, new.ids[-1] + 1), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not tables[0]:
        tables.append(head.weight)
    with torch.no_grad():
        for table in tables:
            old_mean = table[:rows].float().mean(0)
            for token_id, parts in zip(new.ids, new.parts, strict=True):
                start = table[parts].float().mean(0) if parts else old_mean
                table[token_id] = start.to(table.dtype)


def embedding_module_names(model: Any) -> list[str]:
    """The names (last component) of the model's input embedding and, when its weight is not
    the same tensor, output head modules: e.g. ['embed_tokens', 'lm_head'] (['embed_tokens']
    for tied embeddings), as peft's modules_to_save and freeze's module prefixes take them."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    wanted = [embed] + ([head] if head is not None and head.weight is not embed.weight else [])
    names = []
    for name, module in model.named_modules():
        if any(module is w for w in wanted) and name.rsplit(".", 1)[-1] not in names:
            names.append(name.rsplit(".", 1)[-1])
    return names


def ties_embeddings(model: Any) -> bool:
    """True when the LM head is the input embedding's weight (SmolLM2, Gemma)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight
