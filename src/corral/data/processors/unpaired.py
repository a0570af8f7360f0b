"""The "unpaired_preference" kind (kto): one reply a person liked or disliked, plus a KL row.

Each record becomes one example, its last exchange encoded as sft encodes it: the conversation
before the final reply rendered by `encode_turns` (-100: earlier exchanges are context here,
never trained), then the final reply, labelled. A conversation over cutoff_len is fitted by
`truncation.fit_to_cutoff` (earliest exchanges go first, then prompt and reply share the budget,
the reply keeping its start). The record's label (the dataset's kto_tag column) becomes the
row's `kto_label`.

KTO's KL term compares the policy with the reference on replies that do not answer their
prompt, so each row also carries a KL row (kl_input_ids, kl_labels): its own prompt followed by
the final reply of the record kept before it in the same preprocessing batch (the first takes
the last one's), cut to cutoff_len. The pairing is made here, as LLaMA-Factory makes it, rather
than by rotating replies within a training batch as TRL's collator does: LLaMA-Factory's own
KTO example trains with per_device_train_batch_size 1, where an in-batch rotation would give
each prompt its own reply and the KL estimate would turn into the row's own log-ratio (TRL
refuses batch size 1 for that reason). Templates tokenise the prompt and the reply as separate
pieces, so the spliced ids are exactly what the template renders for the mismatched
conversation. (A preprocessing batch that keeps a single record pairs it with itself.)
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors.base import (
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    Encoded,
    first_unlabelled,
)
from corral.data.processors.prompt import split_prompt
from corral.data.processors.truncation import fit_to_cutoff, prompt_of, total
from corral.data.records import Record
from corral.data.templates import Template, chat_messages, encode_turns
from corral.utils.errors import CorralError

NO_LABEL = "no kto_tag label"
# What a dataset needs to feed this kind (LLaMA-Factory's dataset_info key), for the error
# that a dataset without it gets.
NEEDS = (
    'a kto_tag column: map it in the dataset\'s dataset_info.json entry, e.g. "columns": '
    '{"messages": "messages", "kto_tag": "label"}, each row\'s value true (the final reply is '
    "desirable) or false"
)


def encode_unpaired(
    records: list[Record], tokenizer: Any, template: Template, data: DataConfig
) -> list[Encoded]:
    """unpaired_preference: per record, [prompt + reply, prompt + another record's reply],
    prompts at -100, tagged with the record's label."""
    encoded = [_encode_reply(r, tokenizer, template, data) for r in records]
    kept = [e for e in encoded if e.input_ids]
    replies = [split_prompt(e.input_ids[0], e.labels[0])[1] for e in kept]
    for k, example in enumerate(kept):
        prompt, _ = split_prompt(example.input_ids[0], example.labels[0])
        other = replies[k - 1][: data.cutoff_len - len(prompt)]
        example.input_ids.append(prompt + other)
        example.labels.append(first_unlabelled([IGNORE_INDEX] * len(prompt) + other))
    return encoded


def _encode_reply(record: Record, tokenizer: Any, template: Template, data: DataConfig) -> Encoded:
    """The record's last exchange: its prompt (-100) and its final reply (labelled)."""
    if record.label is None:
        return Encoded(status=NO_LABEL)
    try:
        messages = chat_messages(record.to_messages())  # tool calls become assistant replies
        if not messages or messages[-1]["role"] != "assistant":
            return Encoded(status=NO_REPLY)
        turns = encode_turns(template, tokenizer, messages, tools=record.tools)
        if not turns:
            return Encoded(status=NO_REPLY)
        tokens, status = total(turns), ""
        if tokens > data.cutoff_len:
            turns, status = fit_to_cutoff(turns, messages, record, tokenizer, template, data)
            if not turns:
                return Encoded(status=NO_TRAINABLE, tokens=tokens)
    except CorralError as exc:
        return Encoded(status=str(exc))
    prompt, reply = prompt_of(turns), turns[-1][1]
    labels = first_unlabelled([IGNORE_INDEX] * len(prompt) + reply)
    return Encoded([prompt + reply], [labels], status, tokens, tag=record.label)
