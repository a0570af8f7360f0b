"""Reward modelling: score the chosen reply above the rejected one.

    corral train examples/rm_lora.yaml          # stage: rm

The model is loaded with a scalar `score` head in place of its LM head (the row's
`needs_value_head`; see `corral.model.reward`). A sequence's score is the head's output at its
last real token, the end of the reply as the chat template renders it; the loss over a pair is
-log sigmoid(score_chosen - score_rejected) (Bradley-Terry), computed on corral's trainer with
chosen and rejected rows in one forward. TRL's RewardTrainer computes the same loss, but needs
its own data format and a second pass over the model to pool; the shared trainer already has
the pair batches, logging and saving, so the loss is written here once.

Logged per step and, with `eval_` prefixed, in validation: accuracy (the fraction of pairs
whose chosen reply scores higher; a tie counts as wrong), margin (the mean of chosen minus
rejected score), scores/chosen, scores/rejected. The last values go into train_results.json.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from corral.config import CorralConfig
from corral.data.collator import PairCollator
from corral.model.reward import sequence_scores
from corral.train.stages import Stage

METRICS = ("accuracy", "margin", "scores/chosen", "scores/rejected")


def pairwise_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The rm stage's loss hook: mean -log sigmoid(chosen - rejected) over the batch's pairs.

    Args:
        model: a reward model (peft-wrapped too).
        batch: from `PairCollator`: B chosen rows, then B rejected rows, right-padded, with an
            attention_mask giving each row's length.

    Returns:
        (loss, metrics as floats).
    """
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"].sum(-1))
    chosen, rejected = scores.chunk(2)
    margin = chosen - rejected
    metrics = {
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.mean(),
        "scores/chosen": chosen.mean(),
        "scores/rejected": rejected.mean(),
    }
    return -F.logsigmoid(margin).mean(), {k: float(v.detach()) for k, v in metrics.items()}


def make_loss(config: CorralConfig, model: Any) -> Any:  # noqa: ARG001 - the Stage signature
    """The rm loss needs no reference model and no settings."""
    return pairwise_loss


def _after_training(context: Any) -> dict[str, Any]:
    """The last logged training and validation accuracy and margin, for train_results.json."""
    last: dict[str, Any] = {}
    wanted = (*METRICS, *(f"eval_{m}" for m in METRICS), "eval_loss")
    for entry in context.log_history:
        last.update({k: v for k, v in entry.items() if k in wanted})
    return last


STAGE = Stage(
    name="rm",
    dataset_kind="preference",
    needs_value_head=True,
    make_loss=make_loss,
    make_collator=PairCollator,
    after_training=_after_training,
)
