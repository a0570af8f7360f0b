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
from dataclasses import dataclass
from typing import Any

import torch

from corral.config import CorralConfig
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
    if hasattr(model, "get_decoder"):
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        logps, counts = label_logps(hidden, labels, model.get_output_embeddings())
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
        logps, counts = label_logps(logits, labels, None)
    if average:
        logps = logps / counts.clamp(min=1)
    return logps, counts


def pair_logps(model: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
    """`sequence_logps` of a `PairCollator` batch (chosen rows first), split into its sides."""
    return _split_pairs(
        *sequence_logps(model, batch["input_ids"], batch["labels"], average=average)
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
        if next(self.model.parameters()).device != input_ids.device:
            self.model.to(
                input_ids.device
            )  # the Trainer moves the policy only once training starts
        return sequence_logps(self.model, input_ids, labels, average=average)

    def logps(self, policy: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
        """The reference's `pair_logps` of `batch`; `policy` is the model being trained."""
        ids, labels = batch["input_ids"], batch["labels"]
        return _split_pairs(*self.sequence_logps(policy, ids, labels, average=average))


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
