"""Batch tokenised examples into padded tensors.

    collate = Collator(pad_token_id=tokenizer.pad_token_id)
    batch = collate([dataset[0], dataset[1]])

Preference pairs (`PairCollator`) become two rows each, chosen rows first; unpaired (KTO)
examples (`UnpairedCollator`) keep their KL rows beside them, with their labels.

Unpacked examples are padded on the right to the longest one and get an attention_mask.
Packed rows (they carry position_ids) get no attention_mask, so transformers builds the
block-diagonal mask from the position ids (see `corral.data.packing`); their padding starts a
sequence of its own at position 0, so it belongs to no example. Every batch also carries
`num_real_tokens`, the non-padding tokens in it, which the trainer pops to report real
tokens per second.

The model must run with use_cache=False (as in training): with a cache, transformers skips
the packed-sequence detection. Flash-attention 2 detects packed sequences only in a batch of
one row (`modeling_flash_attention_utils._is_packed_sequence`), so with it use
`flatten_packed=True`, which joins a batch's packed rows into one row; sdpa and eager handle
both layouts, but one long row costs them attention over the whole batch length.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


class Collator:
    """Pads a list of examples into a batch of tensors.

    Args:
        pad_token_id: Token id written into padding positions (their labels are -100).
        pad_to_multiple_of: Round the padded length up to a multiple of this (8 suits tensor
            cores); None pads to the longest example exactly.
        flatten_packed: Join packed rows into a single row (batch size 1), as flash-attention
            2 needs to see where examples start.
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = 8, *, flatten_packed: bool = False
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flatten_packed = flatten_packed

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad `features` (dicts of int lists) into input_ids, labels and either
        attention_mask (unpacked) or position_ids (packed), plus num_real_tokens."""
        import torch

        packed = "position_ids" in features[0]
        if packed and self.flatten_packed and len(features) > 1:
            keys = ("input_ids", "labels", "position_ids")
            features = [{k: torch.cat([torch.as_tensor(f[k]) for f in features]) for k in keys}]
        lengths = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long)
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        columns = torch.arange(width)
        real = columns < lengths[:, None]  # (batch, width): True on tokens, False on padding
        batch = {
            "input_ids": _pad(features, "input_ids", real, self.pad_token_id),
            "labels": _pad(features, "labels", real, IGNORE_INDEX),
        }
        if packed:
            # Padding restarts at 0: a sequence of its own that no real token attends to.
            padding_positions = (columns - lengths[:, None]).clamp(min=0)
            batch["position_ids"] = _pad(features, "position_ids", real, 0)
            batch["position_ids"] = torch.where(real, batch["position_ids"], padding_positions)
        else:
            batch["attention_mask"] = real.long()
        batch["num_real_tokens"] = lengths.sum()
        return batch


def _pad(features: list[dict[str, Any]], key: str, real: Any, fill: int) -> Any:
    """A (batch, width) tensor of `fill` with each feature's values written left-aligned."""
    import torch

    out = torch.full(real.shape, fill, dtype=torch.long)
    out[real] = torch.cat([torch.as_tensor(f[key], dtype=torch.long) for f in features])
    return out


class _SidesCollator:
    """Pads the rows each example holds under several column prefixes into one batch: every
    example's first side, then every example's second side, padded by `Collator`'s rules.

    Args:
        pad_token_id: As for `Collator`.
        pad_to_multiple_of: As for `Collator`.
    """

    prefixes: tuple[str, ...] = ()

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad = Collator(pad_token_id, pad_to_multiple_of)

    def _pad_sides(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [
            {"input_ids": f[f"{prefix}input_ids"], "labels": f[f"{prefix}labels"]}
            for prefix in self.prefixes
            for f in features
        ]
        return self.pad(rows)


class PairCollator(_SidesCollator):
    """Pads preference pairs into one batch: the chosen sequences first, then the rejected.

    A batch of B pairs becomes 2B rows (row i is pair i's chosen reply, row B + i its rejected
    one), so a padded forward (reward models, distributed DPO) runs both sides at once and the
    shared-prompt path of `corral.train.preference` finds each pair by its row.
    """

    prefixes = ("chosen_", "rejected_")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad the pairs' chosen_*/rejected_* columns into input_ids, labels, attention_mask
        and num_real_tokens, chosen rows first."""
        return self._pad_sides(features)


class UnpairedCollator(_SidesCollator):
    """Pads unpaired (KTO) examples and their KL rows to one width, with each reply's label.

    The batch holds input_ids and labels (the examples), kl_input_ids and kl_labels (their
    mismatched KL rows, see `corral.data.processors.unpaired`), kto_label (bool: the reply is
    desirable) and num_real_tokens over both, as the model runs over both. One width lets the
    reference score examples and KL rows in one forward.
    """

    prefixes = ("", "kl_")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad the examples and their kl_* rows; carry kto_label as a bool tensor."""
        import torch

        padded, n = self._pad_sides(features), len(features)
        return {
            "input_ids": padded["input_ids"][:n],
            "labels": padded["labels"][:n],
            "kl_input_ids": padded["input_ids"][n:],
            "kl_labels": padded["labels"][n:],
            "kto_label": torch.tensor([bool(f["kto_label"]) for f in features]),
            "num_real_tokens": padded["num_real_tokens"],
        }
