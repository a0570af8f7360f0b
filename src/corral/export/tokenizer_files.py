"""The exported tokenizer: the trained chat template, and the end-of-turn token as its EOS.

A model tuned with, say, ChatML learns to end a reply with `<|im_end|>`; tools that only read
`eos_token` (llama.cpp, Ollama, plain `generate`) stop there only if the exported tokenizer says
so. Both the Hugging Face folder and the GGUF file are written from this one saved tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from corral.data.templates import prefix_every_piece, stop_token_ids
from corral.export.merge import MergedModel

SPM_FILE = "tokenizer.model"  # SentencePiece model, when the tokenizer came from one


def end_of_turn_ids(merged: MergedModel) -> list[int]:
    """Ids that end a reply: the template's end-of-turn token first, then EOS."""
    tokenizer = merged.tokenizer
    if merged.template is None:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return stop_token_ids(merged.template, tokenizer)


def save_tokenizer(merged: MergedModel, folder: Path) -> Path | None:
    """Save the tokenizer with the trained template and end-of-turn EOS into `folder`.

    The chat template goes into `tokenizer_config.json` (not a separate .jinja file), which
    every transformers release and llama.cpp's converter read.

    Returns:
        The copied SentencePiece `tokenizer.model`, or None when there is none.
    """
    tokenizer = merged.tokenizer
    stops = end_of_turn_ids(merged)
    if merged.template is not None:
        tokenizer.chat_template = merged.template.jinja
    if stops and stops[0] != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stops[0])
    prefix_every_piece(tokenizer)  # text tokenized as in training, once loaded again
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    spm = find_spm_model(merged)
    if spm is None:
        return None
    shutil.copyfile(spm, folder / SPM_FILE)
    return folder / SPM_FILE


def find_spm_model(merged: MergedModel) -> Path | None:
    """The SentencePiece model beside the adapters or the base model, if any."""
    for folder in merged.tokenizer_folders():
        if (folder / SPM_FILE).is_file():
            return folder / SPM_FILE
    return None


def uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer adds its BOS token to plain text by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
