"""`build_dataset`: the one entry the train layer calls to get tensors-ready datasets.

    data = build_dataset(config.data, tokenizer, template, kind=stage.dataset_kind, seed=42)
    data.train, data.eval            # datasets.Dataset rows for the Trainer (eval may be None)
    print(format_summary(data.stats))

load_records -> processor for the kind -> lm blocks or packing -> cached as Arrow. A second
run with the same inputs loads the cache (see `corral.data.cache`) and tokenises nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from corral.config.fields import DataConfig
from corral.data.cache import STATS_FILE, cache_dir, cache_key, load_cached, save_cached
from corral.data.loader import load_records
from corral.data.processors import (
    NO_REPLY,
    NO_TRAINABLE,
    DataStats,
    PartStats,
    ProcessedData,
    check_record_kinds,
    finish_part,
    process_records,
    processor_for,
)
from corral.data.records import Record
from corral.data.templates import Template
from corral.utils.distributed import is_local_main_process, wait_until
from corral.utils.errors import DataError
from corral.utils.log import get_logger


def build_dataset(
    data: DataConfig, tokenizer: Any, template: Template, *, kind: str, seed: int
) -> ProcessedData:
    """Load, tokenise, block or pack, and cache the configured datasets.

    Args:
        data: The data configuration (datasets, cutoff_len, packing, ...).
        tokenizer: The model's fast tokenizer.
        template: The chat template (used by the conversation kind).
        kind: The dataset kind the stage trains on ("lm", "conversation").
        seed: Seeds sampling and the validation split (part of the cache key).

    Returns:
        The train and eval datasets (memory-mapped from the cache), their stats, and the
        records they came from (read on first use).

    Raises:
        DataError: a kind that is not implemented, datasets that cannot feed it, or a part
            left without examples after tokenisation (with why).
    """
    log = get_logger()
    processor_for(kind)  # an unimplemented kind fails before any file is read
    key = cache_key(data, tokenizer, template, kind=kind, seed=seed)
    if not is_local_main_process():  # its machine's first process tokenises, once
        wait_until(lambda: _cached_for_this_run(key, data.overwrite_cache))
    cached = None if data.overwrite_cache and is_local_main_process() else load_cached(key)
    if cached is not None:
        log.info(f"using cached dataset {cache_dir(key)} (overwrite_cache=true rebuilds it)")
        train, evaluation, stats = cached
        return ProcessedData(
            train, evaluation, stats, load_records=lambda: load_records(data, seed=seed)
        )

    started = time.perf_counter()
    loaded = load_records(data, seed=seed)
    check_record_kinds(loaded.stats, kind)
    stats = DataStats(
        kind=kind,
        cutoff_len=data.cutoff_len,
        packing=bool(data.packing),
        datasets=[dataclasses.asdict(s) for s in loaded.stats],
        notes=differences_from_llama_factory(loaded.train, data, template, kind),
    )
    train = _tokenise(loaded.train, "train", data, tokenizer, template, kind, stats)
    evaluation = None
    if loaded.eval:
        evaluation = _tokenise(loaded.eval, "eval", data, tokenizer, template, kind, stats)
    folder = save_cached(key, train, evaluation, stats, replace=data.overwrite_cache)
    log.info(
        f"tokenised {len(loaded.train) + len(loaded.eval)} records in "
        f"{time.perf_counter() - started:.1f} s; cached in {folder}"
    )
    train, evaluation, stats = load_cached(key)  # memory-mapped: cheap to share with workers
    return ProcessedData(train, evaluation, stats, loaded=loaded)


def _cached_for_this_run(key: str, rebuilt: bool) -> bool:
    """Whether the cache for `key` is there; with overwrite_cache, written since this process
    started (the local rank 0 started with it and rebuilds it)."""
    stats = cache_dir(key) / STATS_FILE
    if not rebuilt:
        return stats.is_file()
    import psutil  # accelerate's dependency

    try:
        return stats.stat().st_mtime >= psutil.Process().create_time()
    except FileNotFoundError:
        return False


# Deliberate differences from LLaMA-Factory 0.9.5 a configuration can meet (README: "Coming
# from LLaMA-Factory"), printed once in the dataset summary.
ALPACA_INPUT_NOTE = (
    "template alpaca writes Stanford Alpaca's '### Input:' section for rows with an input "
    "(LLaMA-Factory's alpaca template writes instruction and input joined by a newline)"
)
LM_BLOCKS_NOTE = (
    "packing: false concatenates the documents and cuts them into cutoff_len blocks, every token "
    "kept (LLaMA-Factory's pt truncates each document to cutoff_len)"
)


def differences_from_llama_factory(
    records: list[Record], data: DataConfig, template: Template, kind: str
) -> list[str]:
    """What corral does differently from LLaMA-Factory with these records and settings, one
    line each."""
    notes = []
    if kind == "lm" and not data.packing:
        notes.append(LM_BLOCKS_NOTE)
    if kind == "conversation" and template.name == "alpaca":
        users = (m for r in records for m in r.messages if m["role"] == "user")
        if any(m.get("input") for m in users):
            notes.append(ALPACA_INPUT_NOTE)
    return notes


def _tokenise(
    records: list[Record],
    part: str,
    data: DataConfig,
    tokenizer: Any,
    template: Template,
    kind: str,
    stats: DataStats,
) -> Any:
    examples, part_stats = process_records(records, data, tokenizer, template, kind=kind, part=part)
    rows = finish_part(examples, part_stats, data, kind)
    stats.parts.append(part_stats)
    if not len(rows):
        raise DataError(_why_empty(part_stats, data))
    return rows


def _why_empty(stats: PartStats, data: DataConfig) -> str:
    reasons = "; ".join(
        f"{n} {reason} (first at {stats.first_dropped[reason]})"
        for reason, n in stats.dropped.items()
    )
    message = (
        f"no {stats.part} examples are left after tokenisation: all {stats.examples_in} "
        f"records were dropped ({reasons or 'no tokens'})"
    )
    if NO_TRAINABLE in stats.dropped:
        longest = f" (the longest record has {stats.length['max']} tokens)" if stats.length else ""
        message += f"; cutoff_len is {data.cutoff_len}{longest}: raise it"
    if NO_REPLY in stats.dropped:
        message += "; the conversations need an assistant reply to train on"
    return message
