"""Tokenising a part's records with its kind's processor, then blocking or packing them."""

from __future__ import annotations

import json
import uuid
from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    _KEPT_STATUSES,
    IGNORE_INDEX,
    SPLIT,
    TRUNCATED,
    TRUNCATED_RESPONSE,
    Processor,
)
from corral.data.processors.conversation import encode_conversations
from corral.data.processors.lm import cut_into_blocks, encode_documents
from corral.data.processors.preference import encode_preferences
from corral.data.processors.prompt import encode_prompts
from corral.data.processors.stats import PartStats
from corral.data.processors.unpaired import NEEDS, encode_unpaired
from corral.data.records import Record
from corral.data.templates import Template
from corral.utils.errors import DataError
from corral.utils.suggest import did_you_mean

PROCESSORS: dict[str, Processor] = {
    "lm": Processor("lm", accepts=("text", "conversation"), encode=encode_documents),
    "conversation": Processor(
        "conversation", accepts=("conversation",), encode=encode_conversations
    ),
    "preference": Processor(
        "preference", accepts=("preference",), encode=encode_preferences, paired=True
    ),
    "prompt": Processor("prompt", accepts=("conversation", "preference"), encode=encode_prompts),
    "unpaired_preference": Processor(
        "unpaired_preference",
        accepts=("unpaired_preference",),
        encode=encode_unpaired,
        paired=True,  # each reply with its KL row (see processors.unpaired)
        pair_prefixes=("", "kl_"),
        tag_column="kto_label",
        needs=NEEDS,
    ),
}
# Kinds the stage table may name once their stages exist.
PLANNED_KINDS: tuple[str, ...] = ()
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def check_record_kinds(dataset_stats: list[Any], kind: str) -> None:
    """Fail early when a dataset's records cannot feed this dataset kind.

    Args:
        dataset_stats: The loader's per-dataset stats (name, part, kind).
        kind: The dataset kind the stage trains on.

    Raises:
        DataError: naming the dataset, what it holds and what the stage needs.
    """
    processor = processor_for(kind)
    accepts = processor.accepts
    for d in dataset_stats:
        if d.kind and d.kind not in accepts:
            needs = f"; its records need {processor.needs}" if processor.needs else ""
            raise DataError(
                f"dataset '{d.name}' holds {d.kind} records, but this stage trains on {kind} "
                f"data, which takes {' or '.join(accepts)} records{needs}; choose a dataset of "
                "that kind (or a stage that trains on this one)"
            )


def processor_for(kind: str) -> Processor:
    """The processor for a dataset kind.

    Raises:
        DataError: a kind that is planned but not implemented yet, or an unknown kind.
    """
    if kind in PROCESSORS:
        return PROCESSORS[kind]
    if kind in PLANNED_KINDS:
        raise DataError(
            f"dataset kind '{kind}' is not implemented yet; implemented kinds: "
            f"{', '.join(PROCESSORS)}"
        )
    known = [*PROCESSORS, *PLANNED_KINDS]
    raise DataError(f"unknown dataset kind '{kind}'{did_you_mean(kind, known)}")


def process_records(
    records: list[Record],
    data: DataConfig,
    tokenizer: Any,
    template: Template,
    *,
    kind: str,
    part: str = "train",
) -> tuple[Any, PartStats]:
    """Tokenise records into examples with `datasets.map` (num_proc: preprocessing_num_workers).

    Args:
        records: The records of one part (train or eval).
        data: Supplies cutoff_len, train_on_prompt, mask_history, packing and the workers.
        tokenizer: A fast Hugging Face tokenizer.
        template: The chat template (conversation kind).
        kind: The dataset kind, a key of `PROCESSORS`.
        part: "train" or "eval", for stats and messages.

    Returns:
        A `datasets.Dataset` of examples ("input_ids", "labels", "length"), not yet blocked or
        packed, and the part's stats.
    """
    import datasets

    processor = processor_for(kind)
    if not records:
        columns = _pair_columns(processor) if processor.paired else ("input_ids", "labels")
        columns += (processor.tag_column,) if processor.tag_column else ()
        empty = {**{c: [] for c in columns}, "length": []}
        return datasets.Dataset.from_dict(empty), PartStats(part=part)
    rows = datasets.Dataset.from_list([{"record": json.dumps(vars(r))} for r in records])
    features = datasets.Features(
        input_ids=datasets.List(datasets.List(datasets.Value("int32"))),
        labels=datasets.List(datasets.List(datasets.Value("int32"))),
        status=datasets.Value("string"),
        tokens=datasets.Value("int64"),
        source=datasets.Value("string"),
        tag=datasets.Value("bool"),
    )
    workers = data.preprocessing_num_workers
    encoded = rows.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=["record"],
        features=features,
        fn_kwargs={
            "processor": processor,
            "tokenizer": tokenizer,
            "template": template,
            "data": data,
        },
        num_proc=min(workers, len(records)) if workers and workers > 1 else None,
        load_from_cache_file=False,
        # corral caches the result itself; a fresh fingerprint spares hashing the tokenizer.
        new_fingerprint=uuid.uuid4().hex,
        desc=f"tokenising {part} records",
    )
    return _examples_and_stats(encoded, part, processor)


def _encode_batch(
    batch: dict[str, list],
    processor: Processor,
    tokenizer: Any,
    template: Template,
    data: DataConfig,
) -> dict[str, list]:
    records = [Record(**json.loads(text)) for text in batch["record"]]
    encoded = processor.encode(records, tokenizer, template, data)
    return {
        "input_ids": [e.input_ids for e in encoded],
        "labels": [e.labels for e in encoded],
        "status": [e.status for e in encoded],
        "tokens": [e.tokens for e in encoded],
        "tag": [e.tag for e in encoded],
        "source": [
            r.source if e.status not in _KEPT_STATUSES else ""
            for r, e in zip(records, encoded, strict=True)
        ],
    }


def _examples_and_stats(encoded: Any, part: str, processor: Processor) -> tuple[Any, PartStats]:
    """Flatten the per-record example lists into rows (pairs into one row each) and count what
    happened."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = encoded.with_format("arrow")[:]
    statuses = table.column("status").to_pylist()
    sources = table.column("source").to_pylist()
    stats = PartStats(part=part, examples_in=len(statuses))
    for status, source in zip(statuses, sources, strict=True):
        if status in (TRUNCATED, TRUNCATED_RESPONSE, SPLIT):
            stats.truncated += 1
            stats.truncated_responses += status == TRUNCATED_RESPONSE
        elif status:
            stats.dropped[status] = stats.dropped.get(status, 0) + 1
            stats.first_dropped.setdefault(status, source)
    tokens = np.asarray(table.column("tokens"))
    tokens = tokens[tokens > 0]
    if tokens.size:
        stats.length = {f"p{q}": int(np.percentile(tokens, q)) for q in (50, 90, 99)}
        stats.length["max"] = int(tokens.max())
    ids = table.column("input_ids").combine_chunks().flatten()
    labels = table.column("labels").combine_chunks().flatten()
    if processor.paired:  # kept records hold exactly two examples: the pair's first side even
        examples = _pair_rows(ids, labels, _pair_columns(processor))
    else:
        examples = pa.table(
            {"input_ids": ids, "labels": labels, "length": pc.list_value_length(ids)}
        )
    if processor.tag_column:  # one tag per kept record, in the examples' order
        kept = pc.greater(pc.list_value_length(table.column("input_ids")), 0)
        tags = table.column("tag").filter(kept).combine_chunks()
        examples = examples.append_column(processor.tag_column, tags)
    stats.examples = len(examples)
    return datasets.Dataset(examples), stats


def _pair_columns(processor: Processor) -> tuple[str, ...]:
    first, second = processor.pair_prefixes
    return (f"{first}input_ids", f"{first}labels", f"{second}input_ids", f"{second}labels")


def _pair_rows(ids: Any, labels: Any, names: tuple[str, ...]) -> Any:
    """One row per pair (e.g. chosen, rejected), from examples flattened in that order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    chosen, rejected = np.arange(0, len(ids), 2), np.arange(1, len(ids), 2)
    columns = dict(
        zip(
            names,
            (ids.take(chosen), labels.take(chosen), ids.take(rejected), labels.take(rejected)),
            strict=True,
        )
    )
    length = pc.max_element_wise(
        pc.list_value_length(columns[names[0]]), pc.list_value_length(columns[names[2]])
    )
    return pa.table({**columns, "length": length})


def finish_part(examples: Any, stats: PartStats, data: DataConfig, kind: str) -> Any:
    """Cut lm examples into blocks (without packing) or pack them; fills the token counts."""
    import pyarrow.compute as pc

    from corral.data.packing import pack_dataset

    if kind == "lm" and not data.packing:
        rows = cut_into_blocks(examples, data.cutoff_len)
    elif data.packing and len(examples):
        rows = pack_dataset(examples, data.cutoff_len)
    else:
        rows = examples
    table = rows.with_format("arrow")[:]
    stats.rows = len(rows)
    # pairs count both of their sequences: the model runs over both
    for column in ("labels", "chosen_labels", "rejected_labels"):
        if column in table.column_names:
            labels = table.column(column).combine_chunks().flatten()
            stats.real_tokens += len(labels)
            stats.trained_tokens += pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0
    return rows
