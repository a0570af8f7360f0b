"""The tokenizer in GGUF metadata: vocabulary, merges, special tokens and the chat template.

Two kinds, as llama.cpp reads them:

- SentencePiece (`tokenizer.ggml.model = llama`; Llama 1/2, Mistral): pieces, scores and types
  from the original `tokenizer.model`, read with gguf's own `SentencePieceVocab`.
- Byte-level BPE (`gpt2`; SmolLM2, Llama 3, GPT-2 style): tokens and merges from
  `tokenizer.json`; `tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp must use
  (`gpt-2`, `smollm`, or `llama-bpe` for Llama 3).

Special ids (bos, eos = the trained end-of-turn token, unk, pad), add_bos and the chat template
come from the exported tokenizer, so llama.cpp renders and stops exactly as the model was
trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.export.merge import MergedModel
from corral.export.tokenizer_files import SPM_FILE, end_of_turn_ids, uses_bos
from corral.utils.errors import ExportError

# Hugging Face pre-tokenizer (types in order) -> llama.cpp's `tokenizer.ggml.pre` name.
BPE_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",  # the GPT-2 regex
    ("Digits", "ByteLevel"): "smollm",  # GPT-2 regex after splitting every digit
}


def add_tokenizer(writer: Any, merged: MergedModel, folder: Path, *, vocab_rows: int) -> None:
    """Add the tokenizer saved in `folder` to `writer`.

    Args:
        writer: a `gguf.GGUFWriter`.
        merged: the model (its tokenizer, template and end-of-turn ids).
        folder: the exported tokenizer files (`save_tokenizer`).
        vocab_rows: rows of the embedding matrix; the token list is padded to it.

    Raises:
        ExportError: a tokenizer kind or pre-tokenizer llama.cpp would not read the same way.
    """
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if (folder / SPM_FILE).is_file():
        tokens, scores, types = _spm_tokens(folder, merged.tokenizer)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(data))
        merges = False
    elif data["model"]["type"] == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, scores, types = _bpe_tokens(data, merged.tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(data))
        merges = True
    else:
        raise ExportError(
            "GGUF export handles SentencePiece tokenizers (with their tokenizer.model) and "
            f"byte-level BPE tokenizers; this one is a {data['model']['type']} tokenizer "
            f"without {SPM_FILE}"
        )
    tokens, scores, types = _pad(tokens, scores, types, vocab_rows)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens))
    _set_special_tokens(special, merged)
    special.add_to_gguf(writer, quiet=True)


def _set_special_tokens(special: Any, merged: MergedModel) -> None:
    tokenizer = merged.tokenizer
    stops = end_of_turn_ids(merged)
    ids = {"bos": tokenizer.bos_token_id, "unk": tokenizer.unk_token_id}
    ids["pad"] = tokenizer.pad_token_id
    if stops:
        ids["eos"] = ids["eot"] = stops[0]  # the end-of-turn token the model was trained on
    special.special_token_ids = {k: v for k, v in ids.items() if v is not None}
    special.add_special_token = {"bos": uses_bos(tokenizer), "eos": False}
    special.chat_template = merged.template.jinja if merged.template else None


def bpe_pre_tokenizer(data: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer.

    Raises:
        ExportError: for a pre-tokenizer llama.cpp has no regex for here.
    """
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(step.get("type") for step in steps)
    if kinds in BPE_PRE_TOKENIZERS and steps[-1].get("use_regex", True):
        digits_ok = kinds != ("Digits", "ByteLevel") or steps[0].get("individual_digits")
        if digits_ok:
            return BPE_PRE_TOKENIZERS[kinds]
    if kinds == ("Split", "ByteLevel") and _is_llama3_split(steps[0], steps[1]):
        return "llama-bpe"
    raise ExportError(
        f"GGUF export does not know llama.cpp's name for the pre-tokenizer {list(kinds)} in "
        f"tokenizer.json (known: {[list(k) for k in BPE_PRE_TOKENIZERS]} and Llama 3's split); "
        "llama.cpp would split text differently from the tokenizer the model was trained with"
    )


def _is_llama3_split(split: dict[str, Any], byte_level: dict[str, Any]) -> bool:
    """Llama 3's regex split, then byte-level mapping without GPT-2's regex (tiktoken's way)."""
    from corral.export.meta import LLAMA3_PATTERN

    return (
        (split.get("pattern") or {}).get("Regex") == LLAMA3_PATTERN
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
        and not byte_level.get("use_regex", True)
    )


def _bpe_tokens(data: dict[str, Any], tokenizer: Any) -> tuple[list, list, list]:
    import gguf

    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get("special")
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [0.0] * len(tokens), types


def _spm_tokens(folder: Path, tokenizer: Any) -> tuple[list, list, list]:
    import gguf

    vocab = gguf.vocab.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # Tokens added on top of the SentencePiece model (e.g. a chat template's markers).
    for i in range(len(tokens), len(tokenizer)):
        added = tokenizer.added_tokens_decoder.get(i)
        text = added.content if added is not None else f"[PAD{i}]"
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        special = added is not None and added.special
        types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    # Metaspace with prepend_scheme first/always, or a Prepend("▁") normalizer (legacy Llama).
    text = json.dumps([data.get("pre_tokenizer"), data.get("normalizer")])
    return (
        '"prepend_scheme": "first"' in text
        or '"prepend_scheme": "always"' in text
        or ('"Prepend"' in text)
    )


def _pad(tokens: list, scores: list, types: list, rows: int) -> tuple[list, list, list]:
    import gguf

    if len(tokens) > rows:
        raise ExportError(
            f"the tokenizer has {len(tokens)} tokens but the model's embedding only {rows} rows"
        )
    extra = rows - len(tokens)
    return (
        tokens + [f"[PAD{i}]" for i in range(len(tokens), rows)],
        scores + [-1000.0] * extra,
        types + [gguf.TokenType.UNUSED] * extra,
    )
