"""Load the configured datasets as records: read, convert, sample, fill placeholders, mix, split.

    from corral.data.loader import load_records
    data = load_records(config.data, seed=config.train.seed)
    data.train, data.eval          # lists of Record
    for s in data.stats: print(s.describe())

Every step is deterministic for a given seed. Rows that cannot become examples are dropped
with a counted reason (logged, and kept in `stats`); a dataset that ends up empty is an error
that says why.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from corral.config.fields import DataConfig
from corral.data.formats import Dropped, converter_for
from corral.data.readers import list_data_files, read_rows
from corral.data.records import Record
from corral.data.registry import DatasetSpec, resolve_datasets
from corral.utils.errors import DataError
from corral.utils.log import get_logger


@dataclass
class DatasetStats:
    """What happened to one dataset's rows.

    Attributes:
        name: The dataset name as configured.
        part: "train" or "eval".
        kind: The record kind (see `corral.data.records.KINDS`).
        read: Rows read from the files.
        dropped: Reason -> number of rows dropped for it.
        first_dropped: Reason -> where the first such row is ("file.json:12").
        used: Examples kept after num_samples / max_samples.
    """

    name: str
    part: str = "train"
    kind: str = ""
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_dropped: dict[str, str] = field(default_factory=dict)
    used: int = 0

    def drop(self, reason: str, where: str) -> None:
        """Count a dropped row."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_dropped.setdefault(reason, where)

    def reasons(self) -> str:
        """'3 had no assistant reply (first at x.json:7); 1 had ...'."""
        return "; ".join(
            f"{n} {reason} (first at {self.first_dropped[reason]})"
            for reason, n in self.dropped.items()
        )

    def describe(self) -> str:
        """One line for the log: read, dropped (with reasons) and used counts."""
        dropped = sum(self.dropped.values())
        why = f" ({self.reasons()})" if dropped else ""
        counts = f"{self.read} read, {dropped} dropped{why}, {self.used} used"
        return f"{self.part} dataset '{self.name}' ({self.kind}): {counts}"


@dataclass
class LoadedData:
    """The records to train and validate on, and per-dataset counts."""

    train: list[Record]
    eval: list[Record]
    stats: list[DatasetStats]


def load_records(data: DataConfig, *, seed: int) -> LoadedData:
    """Read `data.dataset` (and `data.eval_dataset`) into records, mixed and split.

    Args:
        data: The data configuration.
        seed: Seeds num_samples sampling, interleaving and the validation split.

    Raises:
        DataError: a dataset that cannot be found or read, or that ends up empty (with why),
            or a val_size that leaves nothing to train on.
    """
    if not data.dataset and not data.eval_dataset:
        raise DataError("no dataset given: set `dataset` to dataset_info.json names or file paths")
    if data.eval_dataset and data.val_size:
        raise DataError("set either eval_dataset or val_size, not both")
    # Resolve every name before reading anything, so a typo fails in a second.
    train_specs = resolve_datasets(data.dataset or [], data.dataset_dir)
    eval_specs = resolve_datasets(data.eval_dataset or [], data.dataset_dir)
    stats: list[DatasetStats] = []
    groups = [_load_dataset(spec, data, seed, stats, "train") for spec in train_specs]
    train = mix(groups, data.mix_strategy, data.interleave_probs, seed)
    # Validation sets are concatenated: interleave_probs describe the training mix.
    evaluation = [r for spec in eval_specs for r in _load_dataset(spec, data, seed, stats, "eval")]
    if data.val_size:
        train, evaluation = split(train, data.val_size, seed)
    return LoadedData(train=train, eval=evaluation, stats=stats)


def _load_dataset(
    spec: DatasetSpec, data: DataConfig, seed: int, all_stats: list[DatasetStats], part: str
) -> list[Record]:
    stats = DatasetStats(spec.name, part=part)
    all_stats.append(stats)
    records: list[Record] = []
    # max_samples keeps the first N, so reading can stop there unless num_samples samples all.
    stop = data.max_samples if spec.num_samples is None else None
    for record in _read_records(spec, stats):
        records.append(record)
        if stop is not None and len(records) >= stop:
            break
    if not records:
        raise DataError(_why_empty(spec, stats))
    if spec.num_samples is not None:
        records = _sample(
            records, spec.num_samples, random.Random(f"num_samples:{spec.name}:{seed}")
        )
    records = records[: data.max_samples]
    names = {"{{name}}": data.identity_name, "{{author}}": data.identity_author}
    records = [fill_placeholders(r, names) for r in records]
    stats.kind, stats.used = records[0].kind, len(records)
    if stats.dropped:
        get_logger().warning(stats.describe())
    return records


def _read_records(spec: DatasetSpec, stats: DatasetStats) -> Iterator[Record]:
    convert = converter_for(spec)
    files = list_data_files(spec.path)
    for path in files:
        in_folder = path != spec.path
        label = path.relative_to(spec.path).as_posix() if in_folder else path.name
        prefix = f"{spec.name}:{label}" if in_folder else spec.name
        for number, (line, row) in enumerate(read_rows(path)):
            if number == 0:
                convert.check_columns(row, f"{label}:{line}")
            stats.read += 1
            try:
                yield convert(row, f"{prefix}:{line}")
            except Dropped as reason:
                stats.drop(str(reason), f"{label}:{line}")


def _why_empty(spec: DatasetSpec, stats: DatasetStats) -> str:
    if stats.read == 0:
        return f"dataset '{spec.name}' has no examples: {spec.path} holds no rows"
    return f"all {stats.read} examples of '{spec.name}' were dropped: {stats.reasons()}"


def _sample(records: list[Record], n: int, rng: random.Random) -> list[Record]:
    """n records without repeats while possible, like LLaMA-Factory's num_samples."""
    if n <= len(records):
        return rng.sample(records, n)
    return records + rng.choices(records, k=n - len(records))


def fill_placeholders(record: Record, values: dict[str, str]) -> Record:
    """A copy of `record` with placeholders such as {{name}} replaced in every string."""
    return dataclasses.replace(
        record,
        messages=_fill(record.messages, values),
        system=_fill(record.system, values),
        tools=_fill(record.tools, values),
        chosen=_fill(record.chosen, values),
        rejected=_fill(record.rejected, values),
        text=_fill(record.text, values),
    )


def _fill(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        if "{{" in value:
            for placeholder, text in values.items():
                value = value.replace(placeholder, text)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


def mix(
    groups: list[list[Record]], strategy: str, probs: list[float] | None, seed: int
) -> list[Record]:
    """Combine datasets: concat, or interleave until the shortest (under) or longest (over) ends.

    Interleaving follows `datasets.interleave_datasets`: without probabilities it takes one
    example from each dataset in turn; with them it picks the next dataset at random (seeded).
    interleave_under stops when any dataset runs out; interleave_over restarts exhausted
    datasets until every one has been used in full.

    Raises:
        DataError: an unknown strategy, or probabilities that do not match the datasets.
    """
    if strategy == "concat" or len(groups) <= 1:
        return [record for group in groups for record in group]
    if strategy not in ("interleave_under", "interleave_over"):
        raise DataError(
            f"mix_strategy '{strategy}' is not one of concat, interleave_under, interleave_over"
        )
    until_all = strategy == "interleave_over"
    if probs is None:
        rounds = max(map(len, groups)) if until_all else min(map(len, groups))
        return [group[i % len(group)] for i in range(rounds) for group in groups]
    if len(probs) != len(groups):
        raise DataError(f"interleave_probs has {len(probs)} values for {len(groups)} datasets")
    if min(probs) < 0 or not sum(probs) or (until_all and min(probs) == 0):
        raise DataError(
            f"interleave_probs {probs} must be non-negative and not all zero; interleave_over "
            "also needs every probability above zero, or it never uses that dataset up"
        )
    rng = random.Random(f"interleave:{seed}")
    position = [0] * len(groups)
    exhausted = [False] * len(groups)
    mixed = []
    while not (all(exhausted) if until_all else any(exhausted)):
        i = rng.choices(range(len(groups)), weights=probs)[0]
        mixed.append(groups[i][position[i]])
        position[i] += 1
        if position[i] == len(groups[i]):
            exhausted[i], position[i] = True, 0
    return mixed


def split(records: list[Record], val_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random validation set: a fraction below 1, or a count of examples.

    Both parts keep the original order. Raises DataError when nothing would be left to train on.
    """
    n_eval = int(val_size) if val_size >= 1 else math.ceil(val_size * len(records))
    if n_eval >= len(records):
        raise DataError(
            f"val_size {val_size:g} holds out {n_eval} of the {len(records)} training examples, "
            "leaving none to train on; use a smaller val_size"
        )
    held = set(random.Random(f"split:{seed}").sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]
