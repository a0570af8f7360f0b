"""The stage table: what each training stage needs, as facts the lower layers receive.

Lower layers never compare stage names: the data layer gets `dataset_kind`, the trainer gets
the stage's hooks. Adding rm/kto/ppo means adding a row (and a short module), not editing
`if stage == ...` branches across the code base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: the `stage` config value.
        dataset_kind: which processor turns records into tensors ("lm", "conversation",
            "preference", "unpaired_preference", "prompt").
        needs_reference_model: whether the loss compares with a reference policy (dpo, kto,
            ppo); which one, and whether a loss choice needs none, is the stage's make_loss's.
        needs_value_head: whether the model is loaded with a scalar `score` head in place of
            its LM head (rm: `AutoModelForSequenceClassification`, one label; see
            `corral.model.reward`), kept trainable by every method.
        after_training: checks run on the tuned model, returning metrics for train_results.json.
        make_loss: (config, loaded model) -> the trainer's loss hook, called before the method
            (full/freeze/lora) is applied; the hook maps (model, batch) to (loss, metrics to
            log). None: the shared LM loss on labelled tokens.
        make_collator: (pad_token_id) -> the batch collator; None: the shared `Collator`.
        make_trainer: for stages that generate while they train (ppo, grpo): called with the
            keyword arguments `CorralTrainer` takes (model, args, train_dataset, eval_dataset,
            data_collator, processing_class, callbacks, meter, stage_loss) plus config and
            template, returns the `transformers.Trainer` whose train() runs the stage.
            None: `CorralTrainer`.
        plot_metrics: logged values drawn next to the loss when plot_loss is on, each in
            training_<name>.png (ppo: reward).
    """

    name: str
    dataset_kind: str
    needs_reference_model: bool = False
    needs_value_head: bool = False
    after_training: Callable[..., dict[str, Any]] | None = None
    make_loss: Callable[..., Callable[..., Any]] | None = None
    make_collator: Callable[[int], Any] | None = None
    make_trainer: Callable[..., Any] | None = None
    plot_metrics: tuple[str, ...] = ()


def get_stage(name: str) -> Stage:
    """The table row for a stage (the config layer has already rejected unknown names)."""
    from corral.train import dpo, grpo, kto, ppo, pt, rm, sft

    rows = (pt.STAGE, sft.STAGE, rm.STAGE, dpo.STAGE, kto.STAGE, ppo.STAGE, grpo.STAGE)
    table = {stage.name: stage for stage in rows}
    return table[name]
