"""Pack tokenised examples into rows of at most cutoff_len tokens, each example attending only
to itself.

    rows = pack_dataset(examples, cutoff_len=2048)   # input_ids, labels, position_ids, length

Examples are placed with best-fit decreasing bin packing (longest first, each into the fullest
row it still fits), which typically fills rows to well over 95%. Every example keeps its own
position ids (0, 1, 2, ...) and a row carries no attention_mask: transformers (5.x) then finds
where a new example starts from the position ids (`masking_utils.find_packed_sequence_indices`)
and builds a block-diagonal causal mask, for sdpa, eager and flash attention alike, so a packed
row gives exactly the per-token losses of its examples run one by one
(`tests/test_packing.py` asserts this). Each example's first label is -100 (the data contract),
so no token is trained to predict the next example's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PACKED_COLUMNS = ("input_ids", "labels")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins whose lengths sum to at most `capacity`.

    Deterministic: equal lengths keep their original order. Runs in O(n log n): bins are kept
    in buckets by free space, and a bitmask over free-space values finds the tightest bucket
    that fits in a few big-integer operations.

    Args:
        lengths: Length of every example; each must be between 1 and `capacity`.
        capacity: The most tokens a bin holds (cutoff_len).

    Returns:
        The bins, each a list of example indices (longest first).

    Raises:
        ValueError: an example longer than `capacity` or shorter than 1 token.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> bins with exactly that much free
    has_free = 0  # bit r is set when some bin has exactly r tokens free
    for i in order:
        n = lengths[i]
        if not 1 <= n <= capacity:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1 to {capacity}")
        fits = has_free >> n
        if fits:
            free = n + (fits & -fits).bit_length() - 1  # lowest set bit: the tightest fit
            b = by_free[free].pop()
            if not by_free[free]:
                has_free &= ~(1 << free)
            bins[b].append(i)
        else:
            free, b = capacity, len(bins)
            bins.append([i])
        if free > n:
            by_free.setdefault(free - n, []).append(b)
            has_free |= 1 << (free - n)
    return bins


def pack_dataset(dataset: Any, cutoff_len: int) -> Any:
    """Pack a tokenised `datasets.Dataset` into rows of at most `cutoff_len` tokens.

    Args:
        dataset: Rows with "input_ids" and "labels" (each at most cutoff_len long) and,
            optionally, "length".
        cutoff_len: The most tokens per packed row.

    Returns:
        A `datasets.Dataset` with "input_ids", "labels", "position_ids" (restarting at 0 for
        every example) and "length" (tokens in the row), rows in bin order.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]
    if "length" in table.column_names:
        lengths = table.column("length").to_pylist()
    else:
        lengths = [len(ids) for ids in table.column("input_ids").to_pylist()]
    bins = best_fit_decreasing(lengths, cutoff_len)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    table = table.take(pa.array(order))
    sizes = np.asarray(lengths, dtype=np.int64)[order]  # example lengths in packed order
    row_sizes = np.fromiter((sum(lengths[i] for i in b) for b in bins), np.int64, len(bins))
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int32))
    starts = np.cumsum(sizes) - sizes
    positions = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
    columns = {
        name: pa.ListArray.from_arrays(row_offsets, _values(table.column(name)))
        for name in PACKED_COLUMNS
    }
    columns["position_ids"] = pa.ListArray.from_arrays(row_offsets, pa.array(positions))
    columns["length"] = pa.array(row_sizes)
    return datasets.Dataset(pa.table(columns))


def _values(column: Any) -> Any:
    """The flat values of a (chunked) list column, in row order."""
    return column.combine_chunks().flatten()
