"""What preference stages share: pair log-probs in one forward, and the reference model.

A batch from `PairCollator` holds B chosen rows then B rejected rows; `pair_logps` runs the
model once over all 2B rows and returns each side's summed (or per-token averaged) log-prob of
its reply tokens. `Reference` gives the same numbers for the frozen reference policy, under
`torch.no_grad()`:

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


def pair_logps(model: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
    """One forward over chosen and rejected rows; the log-prob of each reply's tokens.

    Args:
        model: a causal LM (a peft model too); a distributed wrapper without `get_decoder`
            runs its own forward and full logits.
        batch: input_ids and labels from `PairCollator` (chosen rows first); right padding, so
            no attention mask is needed under causal attention (see `CorralTrainer`).
        average: divide each sum by its reply's token count (ipo, orpo, simpo).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if hasattr(model, "get_decoder"):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        logps, counts = label_logps(hidden, labels, model.get_output_embeddings())
    else:
        logits = model(input_ids=ids, use_cache=False).logits
        logps, counts = label_logps(logits, labels, None)
    if average:
        logps = logps / counts.clamp(min=1)
    half = ids.shape[0] // 2
    return PairLogps(logps[:half], logps[half:], counts[:half], counts[half:])


class Reference:
    """The reference policy's pair log-probs (see the module docstring for which model).

    Args:
        model: a separate frozen model, or None to run the policy with its adapter disabled.
    """

    def __init__(self, model: Any | None):
        self.model = model

    @torch.no_grad()
    def logps(self, policy: Any, batch: dict[str, Any], *, average: bool) -> PairLogps:
        """The reference's `pair_logps` of `batch`; `policy` is the model being trained."""
        if self.model is None:
            # a distributed wrapper has no disable_adapter; no gradients, so no sync is needed
            peft_model = getattr(policy, "module", policy)
            with peft_model.disable_adapter():
                return pair_logps(peft_model, batch, average=average)
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)  # the Trainer moves the policy only once training starts
        return pair_logps(self.model, batch, average=average)


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
