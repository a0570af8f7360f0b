"""Extend a model's vocabulary from a corpus and write the extended model folder.

    report = extend_vocabulary("default", ["data/alpaca_zh_demo.json"], add=2000, output="zh")

New embedding (and LM head) rows start as the mean of the rows of the old tokens each new token
joins: far closer to the old model than random rows, yet not as good as it on day 0 (one row
cannot carry the probability of the sequence it replaces; benchmarks/vocab.py measures it), so
`stage: pt` with `additional_target: embed_tokens,lm_head` (or full) then trains them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.model.tokens import MAX_VOCAB, NewTokens, grow_embeddings
from corral.utils.errors import ConfigError, DataError
from corral.utils.log import get_logger
from corral.vocab.bpe import is_byte_level_bpe, learn_merges, old_token_words
from corral.vocab.corpus import read_corpus
from corral.vocab.spm import SPM_FILE, extend_sentencepiece, is_sentencepiece


@dataclass
class ExtendReport:
    """What `extend_vocabulary` did: the tokenizer kind, tokens added, corpus tokens/char."""

    kind: str
    added: int
    first_id: int | None
    tokens_per_char_before: float
    tokens_per_char_after: float


def extend_vocabulary(model: str, corpus: list[str], add: int, output: str) -> ExtendReport:
    """Learn up to `add` tokens from `corpus`, and write `model` with them to `output`.

    Raises:
        ConfigError: `add` is not in 1..MAX_VOCAB - the old size, or the tokenizer is neither
            SentencePiece nor byte-level BPE.
        DataError: a corpus file is missing, empty, not UTF-8, or has fewer tokens than `add`.
        ModelError: the model cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.model.load import resolve_model

    folder = Path(resolve_model(model).path)
    old_tokenizer = AutoTokenizer.from_pretrained(folder)
    _check_add(add, len(old_tokenizer))
    texts = read_corpus(corpus)
    chars = sum(len(t) for t in texts)
    before = sum(len(ids) for ids in old_tokenizer(texts, add_special_tokens=False)["input_ids"])
    if before < add:
        raise DataError(
            f"--corpus: {before} tokens, fewer than --add {add}; give more text or a smaller --add"
        )
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError([f"--output: '{output}' is not empty; choose a new folder"])
    with tempfile.TemporaryDirectory() as tmp:
        kind, new = _extend_tokenizer(folder, old_tokenizer, texts, add, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        # a tokenizer rebuilt from tokenizer.model gets the converter's BOS/EOS rule, not the
        # model's (Llama 2 adds BOS); keep the old one
        tokenizer.backend_tokenizer.post_processor = old_tokenizer.backend_tokenizer.post_processor
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out)
        if (Path(tmp) / SPM_FILE).is_file():  # GGUF export reads the pieces' scores from it
            shutil.copyfile(Path(tmp) / SPM_FILE, out / SPM_FILE)
    weights = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    grow_embeddings(weights, new)
    weights.save_pretrained(out)
    after = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    get_logger().info(f"wrote {out}: {len(new.ids)} new tokens ({kind})")
    return ExtendReport(
        kind, len(new.ids), new.ids[0] if new.ids else None, before / chars, after / chars
    )


def _check_add(add: int, old_size: int) -> None:
    if add < 1:
        raise ConfigError([f"--add: {add}; give the number of tokens to learn (at least 1)"])
    if old_size + add > MAX_VOCAB:
        raise ConfigError(
            [
                f"--add: {add} would make {old_size + add:,} tokens; corral extends a vocabulary "
                f"up to {MAX_VOCAB:,} (at most {MAX_VOCAB - old_size:,} more for this model)"
            ]
        )


def _extend_tokenizer(
    folder: Path, old_tokenizer: Any, texts: list[str], add: int, tmp: Path
) -> tuple[str, NewTokens]:
    """Write the extended tokenizer's files into `tmp`; return its kind and the new tokens."""
    old_tokenizer.save_pretrained(tmp)  # config, special tokens and chat template carry over
    spm_file = folder / SPM_FILE
    if spm_file.is_file() and is_sentencepiece(spm_file):
        (tmp / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from the new tokenizer.model
        return "sentencepiece", extend_sentencepiece(spm_file, texts, add, tmp / SPM_FILE)
    tokenizer_json = json.loads((tmp / "tokenizer.json").read_text())
    if not is_byte_level_bpe(tokenizer_json):
        raise ConfigError(
            [
                f"'{folder}': its tokenizer is {tokenizer_json['model']['type']} without a "
                "SentencePiece tokenizer.model; corral vocab extend handles SentencePiece "
                "(LLaMA 1/2) and byte-level BPE (Llama 3, SmolLM2, Qwen) tokenizers"
            ]
        )
    backend = old_tokenizer.backend_tokenizer
    new = learn_merges(tokenizer_json, old_token_words(backend, texts), add)
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    return "byte-level BPE", new
