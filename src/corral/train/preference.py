"""What preference stages share: reply log-probs in one forward, and the reference model.

`sequence_logps` runs the model once over a batch of rows and returns each row's summed (or
per-token averaged) log-prob of its labelled (reply) tokens. dpo's batch from `PairCollator`
holds B chosen rows then B rejected rows, which `pair_logps` splits; kto's rows are single
replies plus their mismatched KL rows. `Reference` gives the same numbers for the frozen
reference policy, under `torch.no_grad()`:

- ref_model set: that folder (with ref_model_adapters merged), loaded for inference;
- LoRA: the model being trained with its adapter switched off (no second copy in memory);
- full / freeze: a frozen copy of the model as loaded, made before training changes it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from corral.config import CorralConfig
from corral.model.checkpointing import is_checkpointing
from corral.model.prompt_learning import decoder_runs_alone
from corral.train.loss import label_logps


@dataclass
class PairLogps:
    """Log-probs of the chosen and rejected replies of B pairs, each a (B,) tensor."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sequence_logps(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, *, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over `input_ids`; per row, the log-prob of its labelled tokens and their count.

    Args:
        model: a causal LM (a peft model too); a distributed wrapper without `get_decoder`
            runs its own forward and full logits.
        input_ids: (rows, seq), right padded, so no attention mask is needed under causal
            attention (see `CorralTrainer`).
        labels: (rows, seq) aligned with input_ids, -100 where a token is not scored.
        average: divide each sum by its row's labelled-token count (ipo, orpo, simpo).

    Returns:
        (logps, counts): two (rows,) tensors; logps in fp32.
    """
    if decoder_runs_alone(model):
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        logps, counts = label_logps(hidden, labels, model.get_output_embeddings())
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
        logps, counts = label_logps(logits, labels, None)
    if average:
        logps = logps / counts.clamp(min=1)
    return logps, counts


def pair_logps(model: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
    """The log-probs of a `PairCollator` batch's (chosen rows first) replies, split by side.

    A plain model runs pair by pair, its shared prompt once (`shared_prompt_logps`): on
    dpo_en_demo that skips 19% padding and 15% repeated prompt tokens, and holds fewer
    activations. A distributed wrapper (no `get_decoder`) must see one forward for gradient
    synchronisation, and gradient checkpointing turns the KV cache off: both run the padded
    batch through `sequence_logps` instead. The numbers agree to float rounding.
    """
    if not decoder_runs_alone(model) or is_checkpointing(model):
        logps, counts = sequence_logps(model, batch["input_ids"], batch["labels"])
        pairs = _split_pairs(logps, counts)
    else:
        sides = [shared_prompt_logps(model, *pair) for pair in _unpadded_pairs(batch)]
        pairs = PairLogps(*(torch.cat([side[i] for side in sides]) for i in range(4)))
    if average:
        pairs.chosen = pairs.chosen / pairs.chosen_tokens.clamp(min=1)
        pairs.rejected = pairs.rejected / pairs.rejected_tokens.clamp(min=1)
    return pairs


def shared_prompt_logps(
    model: Any,
    chosen: tuple[torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair's summed reply log-probs, with the tokens both rows share run once.

    Causal attention makes the hidden states of a shared prefix the same in both rows, so the
    prefix runs once and leaves its keys and values in a KV cache; each reply then runs on top
    of that cache (cut back to the prefix in between), and gradients flow into the prefix's
    forward through the cached keys and values.

    Args:
        model: a causal LM with `get_decoder` (a peft model too).
        chosen, rejected: (input_ids, labels) of each row, 1-D and unpadded.

    Returns:
        (chosen logp, rejected logp, chosen count, rejected count), each a (1,) tensor.
    """
    from transformers import DynamicCache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    shared = _shared_prefix_length(chosen[0], rejected[0])
    cache = DynamicCache(config=decoder.config)
    prefix_hidden = _cached_forward(decoder, chosen[0][:shared], cache)
    results = []
    for ids, labels in (chosen, rejected):
        if cache.get_seq_length() > shared:
            cache.crop(shared - cache.get_seq_length())  # a negative count: tokens to drop
        hidden = torch.cat([prefix_hidden, _cached_forward(decoder, ids[shared:], cache)], dim=1)
        results.append(label_logps(hidden, labels[None], head))
    (chosen_logp, chosen_count), (rejected_logp, rejected_count) = results
    return chosen_logp, rejected_logp, chosen_count, rejected_count


def _cached_forward(decoder: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """The decoder's hidden states for `ids` (1-D) after what `cache` holds, which it extends."""
    if not len(ids):
        return ids.new_zeros((1, 0, decoder.config.hidden_size), dtype=decoder.dtype)
    # transformers 5.25 renamed past_key_values to cache (the old name goes in 5.40)
    keyword = (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )
    return decoder(input_ids=ids[None], use_cache=True, **{keyword: cache}).last_hidden_state


def _shared_prefix_length(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> int:
    """Leading tokens the two rows share, leaving each row at least one token of its own."""
    both = min(len(chosen_ids), len(rejected_ids)) - 1
    differ = (chosen_ids[:both] != rejected_ids[:both]).nonzero()
    return int(differ[0]) if len(differ) else max(both, 0)


def _unpadded_pairs(batch: dict[str, Any]):
    """(chosen, rejected) of each pair, each (input_ids, labels) without its right padding."""
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    half = ids.shape[0] // 2
    for c, r in zip(range(half), range(half, 2 * half), strict=True):
        yield (
            (ids[c, : lengths[c]], labels[c, : lengths[c]]),
            (ids[r, : lengths[r]], labels[r, : lengths[r]]),
        )


def _split_pairs(logps: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    half = logps.shape[0] // 2
    return PairLogps(logps[:half], logps[half:], counts[:half], counts[half:])


class Reference:
    """The reference policy's log-probs (see the module docstring for which model).

    Args:
        model: a separate frozen model, or None to run the policy with its adapter disabled.
    """

    def __init__(self, model: Any | None):
        self.model = model

    @torch.no_grad()
    def sequence_logps(
        self, policy: Any, input_ids: torch.Tensor, labels: torch.Tensor, *, average: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's `sequence_logps`; `policy` is the model being trained."""
        if self.model is None:
            # a distributed wrapper has no disable_adapter; no gradients, so no sync is needed
            peft_model = getattr(policy, "module", policy)
            with peft_model.disable_adapter():
                return sequence_logps(peft_model, input_ids, labels, average=average)
        self._follow(input_ids.device)
        return sequence_logps(self.model, input_ids, labels, average=average)

    @torch.no_grad()
    def logps(self, policy: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
        """The reference's `pair_logps` of `batch`; `policy` is the model being trained."""
        if self.model is None:
            peft_model = getattr(policy, "module", policy)
            with peft_model.disable_adapter():
                return pair_logps(peft_model, batch, average=average)
        self._follow(batch["input_ids"].device)
        return pair_logps(self.model, batch, average=average)

    def _follow(self, device: torch.device) -> None:
        # the Trainer moves the policy only once training starts
        if next(self.model.parameters()).device != device:
            self.model.to(device)


def build_reference(config: CorralConfig, model: Any) -> Reference:
    """The reference for `model` (loaded, before `apply_method`), as the config asks.

    Args:
        config: supplies ref_model, ref_model_adapters, finetuning_type and the device.
        model: the freshly loaded model that training will change.
    """
    from corral.model.load import load_model

    method = config.method
    if method.ref_model:
        ref_config = dataclasses.replace(
            config.model,
            model_name_or_path=method.ref_model,
            adapter_name_or_path=method.ref_model_adapters,
        )
        reference, _ = load_model(ref_config)
    elif method.finetuning_type == "lora":
        return Reference(None)
    else:
        reference = copy.deepcopy(model)
    return Reference(reference.requires_grad_(False).eval())


def last_logged(log_history: list[dict[str, Any]], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The last logged value of every training metric starting with one of `prefixes`."""
    last: dict[str, Any] = {}
    for entry in log_history:
        last.update({k: v for k, v in entry.items() if k.startswith(prefixes)})
    return last
