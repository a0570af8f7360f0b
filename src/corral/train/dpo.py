"""Direct preference optimisation: raise the chosen reply's likelihood over the rejected one's.

    corral train examples/dpo_lora.yaml          # stage: dpo, pref_loss: sigmoid

The shared trainer runs the stage's loss (`PreferenceLoss`) instead of the LM loss: one forward
over a batch's chosen and rejected rows, the reference's log-probs under no_grad (see
`corral.train.preference`), then one of five losses, with LLaMA-Factory 0.9.5's semantics so
its YAML files train the same thing:

- sigmoid (DPO), hinge (SLiC), ipo: on the margin m = (pi_c - ref_c) - (pi_r - ref_r).
  sigmoid and hinge use summed reply log-probs; ipo uses per-token averages (as LLaMA-Factory,
  and TRL 1.16's DPOTrainer, which averages both the policy's and the reference's).
- orpo and simpo: reference-free (no reference model is loaded), on per-token averages.
  simpo's gamma is `simpo_gamma` itself: logits = (pi_c - pi_r) - simpo_gamma / beta, loss
  -logsigmoid(beta * logits) (LLaMA-Factory's gamma/beta ratio). orpo is the SFT loss on
  the chosen reply plus beta times the odds-ratio loss.

pref_ftx > 0 adds pref_ftx x the chosen reply's per-token NLL to every loss (orpo too, as in
LLaMA-Factory). Logged per step, under TRL's names: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (with a reference the rewards
are beta x (pi - ref); without, beta x pi).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from corral.config import CorralConfig
from corral.config.fields import REFERENCE_FREE_LOSSES, MethodConfig
from corral.data.collator import PairCollator
from corral.train.preference import (
    PairLogps,
    Reference,
    build_reference,
    last_logged,
    pair_logps,
)
from corral.train.stages import Stage

AVERAGED_LOSSES = ("ipo", "orpo", "simpo")  # these compare per-token average log-probs


def preference_losses(
    policy: PairLogps, reference: PairLogps | None, method: MethodConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected replies.

    Args:
        policy: the trained model's log-probs (summed, or averaged for ipo/orpo/simpo).
        reference: the reference's, in the same form; None for orpo and simpo.
        method: supplies pref_loss, pref_beta, simpo_gamma and dpo_label_smoothing.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); the rewards detached.
    """
    beta, kind = method.pref_beta, method.pref_loss
    chosen, rejected = policy.chosen, policy.rejected
    if kind in REFERENCE_FREE_LOSSES:
        losses = _reference_free_losses(chosen, rejected, method)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    chosen_ratio = chosen - reference.chosen
    rejected_ratio = rejected - reference.rejected
    margin = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        smoothing = method.dpo_label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(beta * margin) - smoothing * F.logsigmoid(
            -beta * margin
        )
    elif kind == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:  # ipo
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _reference_free_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, method: MethodConfig
) -> torch.Tensor:
    """orpo and simpo on per-token average log-probs (LLaMA-Factory 0.9.5's formulas)."""
    beta = method.pref_beta
    if method.pref_loss == "orpo":
        # log odds(p) = log p - log(1 - p), for the chosen over the rejected reply
        log_odds = (chosen - rejected) - (
            torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected))
        )
        return -chosen - beta * F.logsigmoid(log_odds)
    # simpo: simpo_gamma is the margin itself; LLaMA-Factory writes it as gamma/beta inside
    return -F.logsigmoid(beta * ((chosen - rejected) - method.simpo_gamma / beta))


class PreferenceLoss:
    """The dpo stage's loss hook for `CorralTrainer`: (model, batch) -> (loss, metrics).

    Args:
        method: the preference settings (pref_loss, pref_beta, pref_ftx, ...).
        reference: where reference log-probs come from; None for orpo and simpo.
    """

    def __init__(self, method: MethodConfig, reference: Reference | None):
        self.method, self.reference = method, reference
        self.average = method.pref_loss in AVERAGED_LOSSES

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch's pairs, and the step's metrics as floats."""
        policy = pair_logps(model, batch, average=self.average)
        reference = (
            None
            if self.reference is None
            else self.reference.logps(model, batch, average=self.average)
        )
        losses, chosen_rewards, rejected_rewards = preference_losses(policy, reference, self.method)
        if self.method.pref_ftx > 0:
            chosen_nll = -policy.chosen
            if not self.average:
                chosen_nll = chosen_nll / policy.chosen_tokens.clamp(min=1)
            losses = losses + self.method.pref_ftx * chosen_nll
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
        }
        return losses.mean(), {k: float(v) for k, v in metrics.items()}


def make_loss(config: CorralConfig, model: Any) -> PreferenceLoss:
    """The stage's loss for `model` as loaded (before `apply_method`): builds its reference."""
    reference_free = config.method.pref_loss in REFERENCE_FREE_LOSSES
    reference = None if reference_free else build_reference(config, model)
    return PreferenceLoss(config.method, reference)


def _after_training(context: Any) -> dict[str, Any]:
    """The last logged rewards and log-probs, for train_results.json."""
    return last_logged(context.log_history, ("rewards/", "logps/"))


STAGE = Stage(
    name="dpo",
    dataset_kind="preference",
    needs_reference_model=True,
    make_loss=make_loss,
    make_collator=PairCollator,
    after_training=_after_training,
)
