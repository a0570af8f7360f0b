"""Counts of what tokenisation did, and the one-screen summary printed before training."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.data.records import Record


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
    notes: list[str] = field(default_factory=list)  # where corral differs from LLaMA-Factory

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
    lines.extend(f"note: {note}" for note in stats.notes)
    return "\n".join(lines)


def _describe_part(p: PartStats, stats: DataStats) -> list[str]:
    units = {"lm": "blocks", "preference": "pairs"}
    unit = "packed rows" if stats.packing else units.get(stats.kind, "rows")
    lines = [f"{p.part}: {p.examples_in} records -> {p.examples} examples -> {p.rows} {unit}"]
    for reason, n in p.dropped.items():
        lines.append(f"  dropped {n}: {reason} (first: {p.first_dropped[reason]})")
    if p.truncated:
        what = "split into cutoff_len pieces" if stats.kind == "lm" else "truncated to cutoff_len"
        replies = (
            f", {p.truncated_responses} of them in the reply (no end-of-turn token trained)"
            if p.truncated_responses
            else ""
        )
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
