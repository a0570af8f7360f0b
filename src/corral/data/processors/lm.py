"""The "lm" kind (language modelling): documents as the tokenizer gives them, every token
trained.

Each document is tokenized as `tokenizer(text)` does by default (a BOS where the model has one)
plus EOS. Without packing the documents are concatenated and cut into cutoff_len blocks, as
LLaMA-Factory does (the last, shorter block is kept). With packing, a document longer than
cutoff_len is split into cutoff_len pieces (none of it is lost), which are then packed.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    EMPTY_DOCUMENT,
    IGNORE_INDEX,
    SPLIT,
    Encoded,
    first_unlabelled,
)
from corral.data.records import Record
from corral.data.templates import Template


def cut_into_blocks(examples: Any, cutoff_len: int) -> Any:
    """Concatenate documents and cut them into cutoff_len blocks, every token but the first of
    a block trained (LLaMA-Factory's pre-training layout; the shorter last block is kept)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    table = examples.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks().flatten()
    total = len(ids)
    offsets = np.append(np.arange(0, total, cutoff_len), total).astype(np.int32)
    labels = np.asarray(ids, dtype=np.int32).copy()
    labels[offsets[:-1]] = IGNORE_INDEX
    blocks = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), ids),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
            "length": pa.array(np.diff(offsets).astype(np.int64)),
        }
    )
    return datasets.Dataset(blocks)


def _document_text(record: Record) -> str:
    if record.text is not None:
        return record.text
    return "\n".join(m["content"] for m in record.to_messages() if m.get("content"))


def encode_documents(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """lm: each document as `tokenizer(text)` gives it plus EOS, every token but the first
    trained; with packing, documents over cutoff_len are split into cutoff_len pieces."""
    texts = [_document_text(r) for r in records]
    batch = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for text, ids in zip(texts, batch, strict=True):
        if not text.strip():
            out.append(Encoded(status=EMPTY_DOCUMENT))
            continue
        if eos is not None and ids[-1:] != [eos]:
            ids = [*ids, eos]
        size = data.cutoff_len if data.packing else len(ids)
        pieces = [ids[i : i + size] for i in range(0, len(ids), size)]
        pieces = [p for p in pieces if len(p) > 1]  # a lone token has nothing to train
        status = SPLIT if len(pieces) > 1 else ""
        out.append(Encoded(pieces, [first_unlabelled(p) for p in pieces], status, len(ids)))
    return out
