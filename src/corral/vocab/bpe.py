"""New tokens for a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen), learned with `tokenizers`.

Each old token becomes one character of a private alphabet and the corpus is written in it, one
pre-tokenised word at a time; `tokenizers`' BPE trainer then learns merges of old tokens. Those
merges are appended after the old ones with new ids after the last old id, so they apply only
where the old merges have done all they can: old ids never change, text without a new token
tokenises as before, and every new token is reachable from the old tokens it joins.
"""

from __future__ import annotations

import json
from typing import Any

from corral.model.tokens import NewTokens
from corral.utils.errors import DataError

# old id -> chr(_ALPHABET_START + id): clear of the surrogates, room for 0.9M ids
_ALPHABET_START = 0x20000


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """True for a BPE model behind a ByteLevel pre-tokenizer (GPT-2 style byte alphabet)."""
    return tokenizer_json["model"]["type"] == "BPE" and "ByteLevel" in json.dumps(
        tokenizer_json.get("pre_tokenizer")
    )


def old_token_words(backend: Any, texts: list[str]) -> list[list[int]]:
    """The corpus as the old tokenizer splits it: per pre-tokenised word, its token ids."""
    words = []
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            words.append([token.id for token in backend.model.tokenize(piece)])
    return words


def learn_merges(tokenizer_json: dict, words: list[list[int]], add: int) -> NewTokens:
    """Append up to `add` merges learned over `words` to `tokenizer_json` (in place).

    Raises:
        DataError: the corpus repeats no pair of old tokens, so there is nothing to learn.
    """
    from tokenizers import Tokenizer, models, trainers

    texts = ["".join(chr(_ALPHABET_START + i) for i in word) for word in words if len(word) > 1]
    alphabet = sorted({c for text in texts for c in text})
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + add,
        min_frequency=2,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    learner = Tokenizer(models.BPE())
    learner.train_from_iterator(texts, trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    if not merges:
        raise DataError("--corpus: no pair of tokens occurs twice; a larger corpus is needed")
    return _append(tokenizer_json, [m.split(" ") if isinstance(m, str) else m for m in merges])


def _append(tokenizer_json: dict, merges: list[list[str]]) -> NewTokens:
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    next_id = 1 + max([*vocab.values(), *(a["id"] for a in tokenizer_json["added_tokens"])])
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    new = NewTokens([], [], [])
    for left, right in merges:
        left_ids = [ord(c) - _ALPHABET_START for c in left]
        right_ids = [ord(c) - _ALPHABET_START for c in right]
        pair = ["".join(by_id[i] for i in left_ids), "".join(by_id[i] for i in right_ids)]
        model["merges"].append(" ".join(pair) if string_merges else pair)
        token = pair[0] + pair[1]
        if token in vocab:  # reached another way before; the merge is still needed from here
            continue
        vocab[token] = next_id
        new.tokens.append(token)
        new.ids.append(next_id)
        new.parts.append(left_ids + right_ids)
        next_id += 1
    return new
