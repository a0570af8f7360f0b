"""Packing and batching: bins respect cutoff_len, a packed row gives exactly the per-token losses
of its examples run one by one (sdpa and eager), and the collator pads as documented."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from corral.data.collator import Collator
from corral.data.packing import best_fit_decreasing, pack_dataset

VOCAB = 256


def _example(n: int, rng: random.Random, first_trained: int = 1) -> dict[str, list[int]]:
    """n random tokens; labels -100 before `first_trained` (the first is always -100)."""
    ids = [rng.randrange(3, VOCAB) for _ in range(n)]
    labels = [-100 if i < max(first_trained, 1) else t for i, t in enumerate(ids)]
    return {"input_ids": ids, "labels": labels}


def test_best_fit_decreasing_fills_bins_tightly():
    bins = best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], capacity=10)
    assert bins == [[0, 1, 6], [2, 3, 4, 5]]  # 5+4+1 and 3+3+2+2: two full bins
    lengths = random.Random(0).choices(range(1, 65), k=500)
    bins = best_fit_decreasing(lengths, capacity=64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # At most one bin may be half empty: two would have been merged by best fit.
    assert sum(sum(lengths[i] for i in b) <= 32 for b in bins) <= 1
    assert bins == best_fit_decreasing(lengths, capacity=64)


def test_best_fit_decreasing_rejects_an_example_over_capacity():
    with pytest.raises(ValueError, match="example 1 has 11 tokens; packing needs 1 to 10"):
        best_fit_decreasing([3, 11], capacity=10)


def test_pack_dataset_keeps_every_example_whole_with_its_own_positions():
    import datasets

    rng = random.Random(1)
    examples = [_example(n, rng, first_trained=2) for n in (6, 1, 9, 4, 3, 7)]
    packed = pack_dataset(datasets.Dataset.from_list(examples), cutoff_len=10)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "length"}
    assert len(packed) == 3  # 30 tokens in rows of 10: 9+1, 7+3, 6+4
    seen = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) <= 10
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start, end in zip(starts, starts[1:] + [row["length"]], strict=True):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == -100  # no target across an example boundary
            seen.append(
                {"input_ids": row["input_ids"][start:end], "labels": row["labels"][start:end]}
            )
    assert sorted(seen, key=str) == sorted(examples, key=str)


def test_collator_pads_unpacked_examples_right_with_an_attention_mask():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3},
            {"input_ids": [8] * 9, "labels": [-100] + [8] * 8, "length": 9},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_real_tokens"}
    assert batch["input_ids"].shape == (2, 16)  # 9 rounded up to a multiple of 8
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert batch["attention_mask"][1].tolist() == [1] * 9 + [0] * 7
    assert batch["num_real_tokens"].dtype == torch.int64
    assert batch["num_real_tokens"].ndim == 0 and int(batch["num_real_tokens"]) == 12


def test_collator_packed_rows_get_positions_and_no_attention_mask():
    rows = [
        {
            "input_ids": [1, 2, 3, 4, 5],
            "labels": [-100, 2, -100, 4, 5],
            "position_ids": [0, 1, 0, 1, 2],
        },
        {"input_ids": [6, 7], "labels": [-100, 7], "position_ids": [0, 1]},
    ]
    batch = Collator(pad_token_id=9, pad_to_multiple_of=None)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_real_tokens"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 9, 9, 9]]
    assert batch["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    # Padding starts its own sequence at 0, so it joins no example.
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert int(batch["num_real_tokens"]) == 7
    flat = Collator(pad_token_id=9, pad_to_multiple_of=8, flatten_packed=True)(rows)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 9]]
    assert flat["labels"].tolist() == [[-100, 2, -100, 4, 5, -100, 7, -100]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 0]]
    assert int(flat["num_real_tokens"]) == 7


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _token_losses(model, batch: dict) -> list[torch.Tensor]:
    """Per-row losses of every labelled position (labels aligned: position i predicts i + 1)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
    # use_cache=False as in training: with a cache, transformers skips packed-sequence detection.
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
    )
    return [row[labels != -100] for row, labels in zip(losses, batch["labels"][:, 1:], strict=True)]


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_losses_of_examples_run_one_by_one(attn, flatten):
    import datasets

    model = _tiny_llama(attn)
    rng = random.Random(2)
    examples = [_example(n, rng, first_trained=rng.randrange(1, n)) for n in (17, 9, 23, 5, 12, 2)]
    examples.append({"input_ids": [42], "labels": [-100]})  # a one-token example trains nothing
    collate = Collator(pad_token_id=0, pad_to_multiple_of=8)
    expected = {}
    for example in examples:
        (loss,) = _token_losses(model, collate([example]))
        expected[tuple(example["input_ids"])] = loss
    packed = pack_dataset(datasets.Dataset.from_list(examples), cutoff_len=40)
    # Rows of 23+17 and 12+9+5+2+1 tokens: the second is padded to 40 in the batch.
    assert packed["length"] == [40, 29]
    want = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start, end in zip(starts, starts[1:] + [row["length"]], strict=True):
            want.append(expected[tuple(row["input_ids"][start:end])])
    batch = Collator(0, 8, flatten_packed=flatten)(list(packed))
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == ((1, 72) if flatten else (2, 40))  # 69 tokens, padded
    losses = torch.cat(_token_losses(model, batch))
    torch.testing.assert_close(losses, torch.cat(want), atol=1e-5, rtol=0)


def test_packed_row_without_block_mask_would_differ():
    """Guards the test above: the same row with one position sequence mixes the examples."""
    model = _tiny_llama("sdpa")
    rng = random.Random(3)
    first, second = _example(8, rng), _example(8, rng)
    row = {k: first[k] + second[k] for k in first}
    packed = Collator(0, None)([{**row, "position_ids": [*range(8), *range(8)]}])
    plain = Collator(0, None)([{**row, "position_ids": list(range(16))}])
    (packed_losses,) = _token_losses(model, packed)
    (plain_losses,) = _token_losses(model, plain)
    assert (packed_losses[7:] - plain_losses[7:]).abs().max() > 1e-3
