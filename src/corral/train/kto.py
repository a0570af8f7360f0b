"""Kahneman-Tversky optimisation: learn from replies marked liked or disliked, one at a time.

    corral train examples/kto_lora.yaml          # stage: kto, pref_beta: 0.1

KTO needs no pairs: each example is one reply with a label (the dataset's kto_tag column). The
shared trainer runs the stage's loss (`KTOLoss`) instead of the LM loss, with LLaMA-Factory
0.9.5's semantics (it subclasses TRL's KTOTrainer, whose loss TRL 1.16 still computes the same
way), so its YAML files train the same thing:

- r = log pi(reply) - log pi_ref(reply), summed over the reply's tokens;
- z = the mean of the same log-ratio over the batch's KL rows (each example's prompt with a
  reply that does not answer it, built while preprocessing: see
  `corral.data.processors.unpaired`), clamped at 0 and detached: the KL(pi || pi_ref) estimate
  that both sides are measured against. The policy's KL log-probs are computed without
  gradients, as in TRL;
- desirable replies: kto_chosen_weight x (1 - sigmoid(beta (r - z))); undesirable ones:
  kto_rejected_weight x (1 - sigmoid(beta (z - r))); the loss is their mean over the batch.

pref_beta is beta. pref_ftx > 0 adds pref_ftx x the desirable replies' mean per-token NLL,
scaled by B / (desirable rows in the batch) as LLaMA-Factory 0.9.5 scales it. The reference is
the dpo stage's (`corral.train.preference`): the adapter switched off (LoRA), a frozen copy
(full, freeze) or ref_model; it scores examples and KL rows in one forward. Logged per step,
under TRL's names: rewards/chosen, rewards/rejected (beta x r of the desirable and the
undesirable replies; a step without one side logs none for it), rewards/margins, kl,
logps/chosen, logps/rejected. Unlike TRL, the KL estimate is per device, not gathered across
processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from corral.config import CorralConfig
from corral.config.fields import MethodConfig
from corral.data.collator import UnpairedCollator
from corral.train.preference import Reference, build_reference, last_logged, sequence_logps
from corral.train.stages import Stage


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_reference: torch.Tensor,
    desirable: torch.Tensor,
    method: MethodConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses, implicit rewards and the batch's KL estimate.

    Args:
        policy: (B,) summed reply log-probs under the trained model.
        reference: (B,) the same under the reference.
        kl_policy: (B,) the KL rows' summed reply log-probs under the trained model.
        kl_reference: (B,) the same under the reference.
        desirable: (B,) bool, the examples' labels.
        method: supplies pref_beta, kto_chosen_weight and kto_rejected_weight.

    Returns:
        (losses, rewards, kl): losses (B,), weighted by side; rewards beta x (policy -
        reference), detached; kl the detached estimate, a scalar >= 0.
    """
    beta = method.pref_beta
    kl = (kl_policy - kl_reference).mean().detach().clamp(min=0)
    ratio = policy - reference
    losses = torch.where(
        desirable,
        method.kto_chosen_weight * (1 - F.sigmoid(beta * (ratio - kl))),
        method.kto_rejected_weight * (1 - F.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach(), kl


class KTOLoss:
    """The kto stage's loss hook for `CorralTrainer`: (model, batch) -> (loss, metrics).

    Args:
        method: the settings (pref_beta, pref_ftx, kto_chosen_weight, kto_rejected_weight).
        reference: where reference log-probs come from.
    """

    def __init__(self, method: MethodConfig, reference: Reference):
        self.method, self.reference = method, reference

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch's examples, and the step's metrics as floats."""
        ids, labels = batch["input_ids"], batch["labels"]
        kl_ids, kl_labels = batch["kl_input_ids"], batch["kl_labels"]
        desirable = batch["kto_label"].to(torch.bool)
        n = ids.shape[0]
        policy, counts = sequence_logps(model, ids, labels)
        with torch.no_grad():  # z is detached: no graph for the KL rows
            kl_policy, _ = sequence_logps(model, kl_ids, kl_labels)
        both, _ = self.reference.sequence_logps(
            model, torch.cat([ids, kl_ids]), torch.cat([labels, kl_labels])
        )
        losses, rewards, kl = kto_losses(
            policy, both[:n], kl_policy, both[n:], desirable, self.method
        )
        loss = losses.mean()
        chosen = int(desirable.sum())
        if self.method.pref_ftx > 0 and chosen:
            nll = -(policy / counts.clamp(min=1))[desirable]
            loss = loss + self.method.pref_ftx * nll.mean() * n / chosen
        return loss, _metrics(rewards, policy.detach(), desirable, kl)


def _metrics(
    rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor
) -> dict[str, float]:
    """TRL's names; a side absent from the batch logs nothing (not a misleading 0)."""
    metrics = {"kl": float(kl)}
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        if mask.any():
            metrics[f"rewards/{side}"] = float(rewards[mask].mean())
            metrics[f"logps/{side}"] = float(logps[mask].mean())
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def make_loss(config: CorralConfig, model: Any) -> KTOLoss:
    """The stage's loss for `model` as loaded (before `apply_method`): builds its reference."""
    return KTOLoss(config.method, build_reference(config, model))


def _after_training(context: Any) -> dict[str, Any]:
    """The last logged rewards, log-probs and KL estimate, for train_results.json."""
    return last_logged(context.log_history, ("rewards/", "logps/", "kl"))


STAGE = Stage(
    name="kto",
    dataset_kind="unpaired_preference",
    needs_reference_model=True,
    make_loss=make_loss,
    make_collator=UnpairedCollator,
    after_training=_after_training,
)
