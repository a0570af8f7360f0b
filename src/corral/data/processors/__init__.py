"""Turn records into training examples: one processor per dataset kind.

    train, stats = process_records(records, data_config, tokenizer, template, kind="conversation")
    print(format_summary(data_stats))

Every example is `{"input_ids", "labels", "length"}`: labels are aligned with input_ids (the
model shifts them), -100 where a token is not trained, and the first label of every example is
always -100, so the labelled tokens are exactly the predicted positions and packed examples
never predict across their boundary.

Kinds (the train layer's stage table names one; this package never sees a stage), one module
each: `lm` (language modelling), `conversation` (sft), `preference` (dpo: a chosen and a
rejected reply to one prompt, kept together in one row), `prompt` (ppo, grpo: the prompt a
policy answers, with the dataset's reply as a labelled reference) and `unpaired` (kto: one
liked or disliked reply with its kto_label, and a mismatched KL row beside it). `pipeline` runs a kind's
processor over a part's records; `stats` counts what happened (examples that end with no
trainable token are dropped and counted by reason, with token length percentiles and the
trained fraction) for `format_summary`.
"""

from corral.data.processors.base import (
    EMPTY_DOCUMENT,
    IGNORE_INDEX,
    NO_REPLY,
    NO_TRAINABLE,
    SPLIT,
    TRUNCATED,
    TRUNCATED_RESPONSE,
    Encoded,
    Processor,
)
from corral.data.processors.conversation import encode_conversations, label_turns
from corral.data.processors.lm import encode_documents
from corral.data.processors.pipeline import (
    PAIR_COLUMNS,
    PLANNED_KINDS,
    PROCESSORS,
    check_record_kinds,
    finish_part,
    process_records,
    processor_for,
)
from corral.data.processors.preference import NO_PAIR, SAME_REPLIES, encode_preferences
from corral.data.processors.prompt import NO_PROMPT, PROMPT_TOO_LONG, encode_prompts, split_prompt
from corral.data.processors.stats import DataStats, PartStats, ProcessedData, format_summary
from corral.data.processors.unpaired import NO_LABEL, encode_unpaired

__all__ = [
    "EMPTY_DOCUMENT",
    "IGNORE_INDEX",
    "NO_LABEL",
    "NO_PAIR",
    "NO_PROMPT",
    "PROMPT_TOO_LONG",
    "NO_REPLY",
    "NO_TRAINABLE",
    "PAIR_COLUMNS",
    "PLANNED_KINDS",
    "PROCESSORS",
    "SAME_REPLIES",
    "SPLIT",
    "TRUNCATED",
    "TRUNCATED_RESPONSE",
    "DataStats",
    "Encoded",
    "PartStats",
    "ProcessedData",
    "Processor",
    "check_record_kinds",
    "encode_conversations",
    "encode_documents",
    "encode_preferences",
    "encode_prompts",
    "encode_unpaired",
    "finish_part",
    "format_summary",
    "label_turns",
    "process_records",
    "processor_for",
    "split_prompt",
]
