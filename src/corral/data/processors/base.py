"""What every processor shares: the example layout, the statuses, the `Processor` record.

Every example is `{"input_ids", "labels", "length"}`: labels are aligned with input_ids (the
model shifts them), -100 where a token is not trained, and the first label of every example is
always -100, so the labelled tokens are exactly the predicted positions and packed examples
never predict across their boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.config.fields import DataConfig
from corral.data.records import Record
from corral.data.templates import Template

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
    tag: bool | None = None  # a value kept beside the examples (unpaired: is the reply liked?)


@dataclass(frozen=True)
class Processor:
    """One dataset kind: the record kinds it accepts and how it encodes a batch of records.

    With `paired`, every kept record gives exactly two examples that the pipeline keeps in one
    row, their columns named with `pair_prefixes` (chosen_input_ids, chosen_labels,
    rejected_input_ids, rejected_labels by default) plus length (the longer of the two). With
    `tag_column`, each kept record's `Encoded.tag` becomes that column. `needs` says what a
    dataset must have to give this kind's records, for the error when one does not.
    """

    kind: str
    accepts: tuple[str, ...]
    encode: Callable[[list[Record], Any, Template, DataConfig], list[Encoded]]
    paired: bool = False
    pair_prefixes: tuple[str, str] = ("chosen_", "rejected_")
    tag_column: str | None = None
    needs: str = ""


def first_unlabelled(labels: list[int]) -> list[int]:
    """`labels` with the first one set to -100 (nothing predicts an example's first token)."""
    return [IGNORE_INDEX, *labels[1:]] if labels else labels
