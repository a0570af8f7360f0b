"""Turn records into training examples: one processor per dataset kind.

    train, stats = process_records(records, data_config, tokenizer, template, kind="conversation")
    print(format_summary(data_stats))

Every example is `{"input_ids", "labels", "length"}`: labels are aligned with input_ids (the
model shifts them), -100 where a token is not trained, and the first label of every example is
always -100, so the labelled tokens are exactly the predicted positions and packed examples
never predict across their boundary.

Kinds (the train layer's stage table names one; this module never sees a stage):

- "lm" (language modelling): each document is tokenized as `tokenizer(text)` does by default
  (a BOS where the model has one) plus EOS, and every token is trained. Without packing the
  documents are concatenated and cut into cutoff_len blocks, as LLaMA-Factory does (the last,
  shorter block is kept). With packing, a document longer than cutoff_len is split into
  cutoff_len pieces (none of it is lost), which are then packed.
- "conversation" (sft): `encode_turns` renders the conversation with the chat template; every
  assistant reply is trained (only the last with mask_history; prompts too with
  train_on_prompt). A conversation over cutoff_len first loses whole earliest exchanges (the
  rest is rendered again, so the system prompt and the template's opening stay), then its
  prompt is cut from the left, keeping the text nearest the reply, and only a reply that alone
  exceeds cutoff_len is cut from the right (it then has no end-of-turn token to learn).

Examples that end with no trainable token are dropped and counted by reason; `ProcessStats`
keeps the counts, token length percentiles and the trained fraction for `format_summary`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.config.fields import DataConfig
from corral.data.records import Record
from corral.data.templates import Template, encode_turns
from corral.utils.errors import CorralError, DataError
from corral.utils.suggest import did_you_mean

IGNORE_INDEX = -100
TRUNCATED = "truncated"
TRUNCATED_RESPONSE = "truncated response"
SPLIT = "split"  # an lm document longer than cutoff_len, cut into pieces
NO_REPLY = "no assistant reply"
NO_TRAINABLE = "no trainable token after truncation"
EMPTY_DOCUMENT = "empty document"
_KEPT_STATUSES = ("", TRUNCATED, TRUNCATED_RESPONSE, SPLIT)


@dataclass
class Encoded:
    """What a processor made of one record: zero or more examples, and what happened."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    status: str = ""  # "", TRUNCATED, TRUNCATED_RESPONSE, SPLIT, or the reason it was dropped
    tokens: int = 0  # the record's length in tokens before any truncation


@dataclass(frozen=True)
class Processor:
    """One dataset kind: the record kinds it accepts and how it encodes a batch of records."""

    kind: str
    accepts: tuple[str, ...]
    encode: Callable[[list[Record], Any, Template, DataConfig], list[Encoded]]


# --- Stats and the summary -------------------------------------------------------------------


@dataclass
class PartStats:
    """What tokenisation did to one part (train or eval).

    Attributes:
        part: "train" or "eval".
        examples_in: Records given to the processor.
        examples: Examples made (lm: documents or their pieces), before blocking or packing.
        rows: Rows the trainer sees (examples, lm blocks, or packed rows).
        dropped: Reason -> records dropped for it.
        first_dropped: Reason -> the first such record's source ("dataset:line").
        truncated: Records cut to fit cutoff_len (lm with packing: documents split).
        truncated_responses: Of those, records whose trained reply itself was cut.
        length: p50/p90/p99/max tokens per record before truncation.
        real_tokens: Tokens in all rows (no padding).
        trained_tokens: Tokens with a label.
    """

    part: str
    examples_in: int = 0
    examples: int = 0
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_dropped: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    truncated_responses: int = 0
    length: dict[str, int] = field(default_factory=dict)
    real_tokens: int = 0
    trained_tokens: int = 0


@dataclass
class DataStats:
    """Everything `format_summary` prints: settings, per-dataset reading counts, per-part
    tokenisation counts. Saved as JSON beside a cached dataset."""

    kind: str
    cutoff_len: int
    packing: bool
    datasets: list[dict[str, Any]] = field(default_factory=list)
    parts: list[PartStats] = field(default_factory=list)

    def to_json(self) -> str:
        """The stats as JSON text."""
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataStats:
        """Stats written by `to_json`."""
        raw = json.loads(text)
        raw["parts"] = [PartStats(**part) for part in raw["parts"]]
        return cls(**raw)


def format_summary(stats: DataStats) -> str:
    """One screen of plain text describing the tokenised data, printed before training."""
    packing = "on" if stats.packing else "off"
    lines = [f"kind {stats.kind}, cutoff_len {stats.cutoff_len}, packing {packing}"]
    for d in stats.datasets:
        dropped = sum(d["dropped"].values())
        why = "".join(f"; {n} {reason}" for reason, n in d["dropped"].items())
        lines.append(
            f"  {d['part']} dataset '{d['name']}' ({d['kind']}): {d['read']} read, "
            f"{dropped} dropped{why}, {d['used']} used"
        )
    for p in stats.parts:
        lines.extend(_describe_part(p, stats))
    return "\n".join(lines)


def _describe_part(p: PartStats, stats: DataStats) -> list[str]:
    unit = "packed rows" if stats.packing else ("blocks" if stats.kind == "lm" else "rows")
    lines = [f"{p.part}: {p.examples_in} records -> {p.examples} examples -> {p.rows} {unit}"]
    for reason, n in p.dropped.items():
        lines.append(f"  dropped {n}: {reason} (first: {p.first_dropped[reason]})")
    if p.truncated:
        what = "split into cutoff_len pieces" if stats.kind == "lm" else "truncated to cutoff_len"
        replies = f", {p.truncated_responses} of them in the reply" if p.truncated_responses else ""
        lines.append(f"  {p.truncated} records {what}{replies}")
    if p.length:
        lengths = ", ".join(f"{k} {v}" for k, v in p.length.items())
        lines.append(f"  tokens per record: {lengths}")
    trained = p.trained_tokens / p.real_tokens if p.real_tokens else 0.0
    lines.append(f"  {p.real_tokens:,} real tokens, {p.trained_tokens:,} trained ({trained:.1%})")
    if stats.packing and p.rows:
        fill = p.real_tokens / (p.rows * stats.cutoff_len)
        lines.append(f"  packed rows are {fill:.1%} full")
    return lines


@dataclass
class ProcessedData:
    """The tokenised datasets the trainer uses, their stats, and (loaded on first use) the
    records they came from.

    Attributes:
        train: `datasets.Dataset` of rows: input_ids, labels, length (and position_ids when
            packed).
        eval: The validation rows, or None when there is no validation set.
        stats: What loading and tokenisation did, for `format_summary`.
    """

    train: Any
    eval: Any | None
    stats: DataStats
    load_records: Callable[[], Any] | None = field(default=None, repr=False)
    loaded: Any = field(default=None, repr=False)  # the loader's LoadedData, once read

    @property
    def train_records(self) -> list[Record]:
        """The training records (read again on first use when the rows came from the cache)."""
        return self._records().train

    @property
    def eval_records(self) -> list[Record]:
        """The validation records (read again on first use when the rows came from the cache)."""
        return self._records().eval

    def _records(self) -> Any:
        if self.loaded is None and self.load_records is not None:
            self.loaded = self.load_records()
        return self.loaded


# --- Processing ------------------------------------------------------------------------------


def check_record_kinds(dataset_stats: list[Any], kind: str) -> None:
    """Fail early when a dataset's records cannot feed this dataset kind.

    Args:
        dataset_stats: The loader's per-dataset stats (name, part, kind).
        kind: The dataset kind the stage trains on.

    Raises:
        DataError: naming the dataset, what it holds and what the stage needs.
    """
    accepts = processor_for(kind).accepts
    for d in dataset_stats:
        if d.kind and d.kind not in accepts:
            raise DataError(
                f"dataset '{d.name}' holds {d.kind} records, but this stage trains on {kind} "
                f"data, which takes {' or '.join(accepts)} records; choose a dataset of that "
                "kind (or a stage that trains on this one)"
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
        empty = {"input_ids": [], "labels": [], "length": []}
        return datasets.Dataset.from_dict(empty), PartStats(part=part)
    rows = datasets.Dataset.from_list([{"record": json.dumps(vars(r))} for r in records])
    features = datasets.Features(
        input_ids=datasets.List(datasets.List(datasets.Value("int32"))),
        labels=datasets.List(datasets.List(datasets.Value("int32"))),
        status=datasets.Value("string"),
        tokens=datasets.Value("int64"),
        source=datasets.Value("string"),
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
    return _examples_and_stats(encoded, part)


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
        "source": [
            r.source if e.status not in _KEPT_STATUSES else ""
            for r, e in zip(records, encoded, strict=True)
        ],
    }


def _examples_and_stats(encoded: Any, part: str) -> tuple[Any, PartStats]:
    """Flatten the per-record example lists into rows and count what happened."""
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
    examples = pa.table({"input_ids": ids, "labels": labels, "length": pc.list_value_length(ids)})
    stats.examples = len(examples)
    return datasets.Dataset(examples), stats


def finish_part(examples: Any, stats: PartStats, data: DataConfig, kind: str) -> Any:
    """Cut lm examples into blocks (without packing) or pack them; fills the token counts."""
    import pyarrow.compute as pc

    from corral.data.packing import pack_dataset

    if kind == "lm" and not data.packing:
        rows = _cut_into_blocks(examples, data.cutoff_len)
    elif data.packing and len(examples):
        rows = pack_dataset(examples, data.cutoff_len)
    else:
        rows = examples
    table = rows.with_format("arrow")[:]
    labels = table.column("labels").combine_chunks().flatten()
    stats.rows = len(rows)
    stats.real_tokens = len(labels)
    stats.trained_tokens = pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0
    return rows


def _cut_into_blocks(examples: Any, cutoff_len: int) -> Any:
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


# --- Language modelling ----------------------------------------------------------------------


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
        out.append(Encoded(pieces, [_first_unlabelled(p) for p in pieces], status, len(ids)))
    return out


def _first_unlabelled(labels: list[int]) -> list[int]:
    return [IGNORE_INDEX, *labels[1:]] if labels else labels


# --- Conversations ---------------------------------------------------------------------------


def encode_conversations(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """conversation: prompt tokens -100, assistant replies trained, truncated to cutoff_len."""
    return [_encode_conversation(r, tokenizer, template, data) for r in records]


def _encode_conversation(
    record: Record, tokenizer: Any, template: Template, data: DataConfig
) -> Encoded:
    messages = record.to_messages()
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a trailing prompt has no reply to learn; encode_turns would train it
    try:
        turns = encode_turns(template, tokenizer, messages, tools=record.tools)
        if not turns:
            return Encoded(status=NO_REPLY)
        tokens = _total(turns)
        status = ""
        if tokens > data.cutoff_len:
            turns = _drop_earliest_turns(turns, messages, record, tokenizer, template, data)
            turns, status = _truncate_last_turn(turns, data.cutoff_len)
    except CorralError as exc:
        return Encoded(status=str(exc))
    ids, labels = label_turns(
        turns, train_on_prompt=data.train_on_prompt, mask_history=data.mask_history
    )
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded(status=NO_TRAINABLE, tokens=tokens)
    return Encoded([ids], [labels], status, tokens)


def label_turns(
    turns: list[tuple[list[int], list[int]]], *, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    """Concatenate (prompt, response) pairs into input_ids and aligned labels.

    Responses are trained (with mask_history only the last turn's), prompts only with
    train_on_prompt (in trained turns); the first label is always -100.
    """
    ids: list[int] = []
    labels: list[int] = []
    last = len(turns) - 1
    for k, (prompt, response) in enumerate(turns):
        trained = not mask_history or k == last
        ids += prompt
        ids += response
        labels += prompt if trained and train_on_prompt else [IGNORE_INDEX] * len(prompt)
        labels += response if trained else [IGNORE_INDEX] * len(response)
    return ids, _first_unlabelled(labels)


def _total(turns: list[tuple[list[int], list[int]]]) -> int:
    return sum(len(prompt) + len(response) for prompt, response in turns)


def _drop_earliest_turns(
    turns: list[tuple[list[int], list[int]]],
    messages: list[dict],
    record: Record,
    tokenizer: Any,
    template: Template,
    data: DataConfig,
) -> list[tuple[list[int], list[int]]]:
    """Drop whole earliest exchanges while more than one remains and the total is too long.

    The remaining messages are rendered again (with the system prompt), so the template's
    opening (BOS, system block) stays in front of the first kept exchange.
    """
    reply_ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    dropped = 0
    while len(turns) > 1 and _total(turns) > data.cutoff_len:
        # Guess how many to drop from the token counts; the loop re-checks the rendering.
        excess, n = _total(turns) - data.cutoff_len, 0
        while n < len(turns) - 1 and excess > 0:
            excess -= len(turns[n][0]) + len(turns[n][1])
            n += 1
        dropped += n
        kept = head + messages[reply_ends[dropped - 1] :]
        turns = encode_turns(template, tokenizer, kept, tools=record.tools)
    return turns


def _truncate_last_turn(
    turns: list[tuple[list[int], list[int]]], cutoff_len: int
) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Fit a conversation already reduced to what `_drop_earliest_turns` leaves.

    A single remaining turn keeps its whole reply when it fits in cutoff_len - 1 (at least one
    prompt token before it, so the reply's first token is a prediction target); its prompt is
    cut from the left. A longer reply is cut from the right.
    """
    if _total(turns) <= cutoff_len:
        return turns, TRUNCATED
    [(prompt, response)] = turns
    keep_response = min(len(response), cutoff_len - (1 if prompt else 0))
    keep_prompt = min(len(prompt), cutoff_len - keep_response)
    status = TRUNCATED_RESPONSE if keep_response < len(response) else TRUNCATED
    return [(prompt[len(prompt) - keep_prompt :], response[:keep_response])], status


PROCESSORS: dict[str, Processor] = {
    "lm": Processor("lm", accepts=("text", "conversation"), encode=encode_documents),
    "conversation": Processor(
        "conversation", accepts=("conversation",), encode=encode_conversations
    ),
}
# Kinds the stage table may name once their stages exist.
PLANNED_KINDS = ("preference", "unpaired_preference", "prompt")
