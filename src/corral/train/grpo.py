"""Group relative policy optimisation (GRPO) on TRL's `GRPOTrainer`.

    corral train examples/grpo_lora.yaml         # stage: grpo, reward_funcs: rewards:my_reward

Each step samples `num_generations` replies to every prompt, scores them with the reward
functions named in `reward_funcs` (Python 'module:function', summed), and pushes up the replies
that beat their group's mean reward (the advantage is the reward minus the group mean, over the
group's standard deviation). `grpo_beta` > 0 adds a KL penalty to the model as loaded (with LoRA:
the adapter as it started, so no second model; full/freeze: a frozen copy TRL loads).

Why TRL: generation, the group advantages and the clipped policy loss are GRPOTrainer's, tested
upstream; corral only feeds it. What corral adds is in `CorralGRPOTrainer`:

- the prompt tokens are corral's own (the `prompt` data kind: the conversation rendered with the
  generation prompt exactly as `corral chat` renders it); TRL would re-tokenise the text, which
  may add a second BOS or split differently;
- replies stop on the template's stop tokens, as in chat;
- the Trainer arguments are the ones every stage uses (`training_arguments`), copied into a
  `GRPOConfig` once, so bf16 and gradient checkpointing follow corral's settings, not TRL's
  defaults (which fail on CPU). `per_device_train_batch_size` counts prompts: TRL's batch of
  replies is it times `num_generations`.

A reward function is called as TRL calls it, with keyword arguments: `prompts` (the rendered
prompt texts), `completions` (the reply texts), `completion_ids`, `reference` (the dataset's
reply for that prompt, '' if none), `prompt_ids`, and TRL's `trainer_state`, `log_extra`,
`log_metric`; it returns one float per reply (None skips it). Take `**kwargs` to ignore the rest.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.config import CorralConfig
from corral.data.templates import Template, stop_token_ids
from corral.train.rewards import load_reward
from corral.train.stages import Stage
from corral.train.trainer import TokenMeter, WholeCheckpoints
from corral.utils.errors import ConfigError


def load_reward_funcs(specs: list[str]) -> list[Callable[..., list[float]]]:
    """Import each 'module:function' of `reward_funcs` (the current directory first).

    Raises:
        ConfigError: every spec that is malformed, fails to import, or is not callable.
    """
    if str(Path.cwd()) not in sys.path:  # so a user's own rewards.py next to the YAML imports
        sys.path.insert(0, str(Path.cwd()))
    funcs, problems = [], []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            problems.append(
                f"reward_funcs: '{spec}' is not 'module:function' (e.g. rewards:length)"
            )
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a user's module may raise anything while it imports
            problems.append(
                f"reward_funcs: '{spec}': cannot import module '{module_name}' "
                f"({type(exc).__name__}: {exc})"
            )
            continue
        func = getattr(module, attr, None)
        if func is None:
            problems.append(f"reward_funcs: '{spec}': module '{module_name}' has no '{attr}'")
        elif not callable(func):
            problems.append(
                f"reward_funcs: '{spec}': '{attr}' is a {type(func).__name__}, not a function"
            )
        else:
            funcs.append(func)
    if problems:
        raise ConfigError(problems)
    return funcs


def grpo_arguments(config: CorralConfig, args: Any) -> Any:
    """The `GRPOConfig`: corral's Trainer arguments, plus GRPO's sampling and group settings.

    Args:
        config: supplies num_generations, grpo_beta and the generation keys.
        args: the `TrainingArguments` every stage trains with (`training_arguments`).
    """
    from transformers import TrainingArguments
    from trl import GRPOConfig

    shared = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and not f.name.startswith("_")
    }
    method, generation = config.method, config.generation
    groups = method.num_generations
    shared.update(
        # corral's batch counts prompts; TRL's counts replies, num_generations per prompt
        per_device_train_batch_size=args.per_device_train_batch_size * groups,
        per_device_eval_batch_size=args.per_device_eval_batch_size * groups,
        train_sampling_strategy="random",  # GRPOTrainer samples prompt groups itself
    )
    return GRPOConfig(
        **shared,
        num_generations=groups,
        beta=method.grpo_beta,
        max_completion_length=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        repetition_penalty=generation.repetition_penalty,
        log_completions=False,  # it would print a rich table every logging step
    )


def to_trl_dataset(dataset: Any, tokenizer: Any) -> Any:
    """prompt-kind rows -> TRL's columns: prompt (text), prompt_ids, reference (reply text)."""
    if dataset is None:
        return None
    from corral.data.processors import split_prompt

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        prompt, reply = split_prompt(row["input_ids"], row["labels"])
        return {
            "prompt": tokenizer.decode(prompt),
            "prompt_ids": prompt,
            "reference": tokenizer.decode(reply, skip_special_tokens=True),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def _grpo_trainer_class() -> type:
    from trl import GRPOTrainer

    class CorralGRPOTrainer(WholeCheckpoints, GRPOTrainer):
        """GRPOTrainer that generates from corral's prompt tokens and counts real tokens.

        Args:
            meter: counts real (prompt + reply) and trained (reply) tokens for tokens/s.
        """

        def __init__(self, *args: Any, meter: TokenMeter, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.meter = meter
            self._prompt_ids: list[list[int]] = []

        def _generate_and_score_completions(self, inputs):
            # TRL passes only the prompt texts on to `_tokenize_prompts`; keep their ids here
            self._prompt_ids = [list(x["prompt_ids"]) for x in inputs]
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                replies = int(output["completion_mask"].sum())
                self.meter.trained_tokens += replies
                self.meter.real_tokens += replies + int(output["prompt_mask"].sum())
            return output

        def _tokenize_prompts(self, prompts):
            # corral's encoding, token for token as chat sends it (no re-tokenising, no 2nd BOS)
            return self._prompt_ids, None, {}

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            # With grpo_beta > 0 TRL keeps the starting adapter as a second one named "ref"; it
            # is not what was trained, so the folder holds the trained adapter alone.
            shutil.rmtree(Path(output_dir or self.args.output_dir) / "ref", ignore_errors=True)

    return CorralGRPOTrainer


def make_trainer(
    *,
    config: CorralConfig,
    template: Template,
    model: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    processing_class: Any,
    callbacks: list[Any],
    meter: TokenMeter,
    **_: Any,  # data_collator, stage_loss: GRPO batches prompts itself and has its own loss
) -> Any:
    """The configured `GRPOTrainer` subclass for the workflow (see `Stage.make_trainer`)."""
    tokenizer = processing_class
    reward_funcs = load_reward_funcs(config.method.reward_funcs or [])
    if config.method.reward_model:
        reward_funcs.append(reward_model_func(config, tokenizer, template))
    # Replies end where chat's do: the template's end-of-turn token(s) and eos. GRPOTrainer
    # takes its stop ids from the model's generation config.
    model.generation_config.eos_token_id = stop_token_ids(template, tokenizer)
    return _grpo_trainer_class()(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_arguments(config, args),
        train_dataset=to_trl_dataset(train_dataset, tokenizer),
        eval_dataset=to_trl_dataset(eval_dataset, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        meter=meter,
    )


def reward_model_func(
    config: CorralConfig, tokenizer: Any, template: Template
) -> Callable[..., list[float]]:
    """`reward_model` as a reward function: the rm's score of prompt + reply token ids, the
    reply finished as the rm was trained on it (see `corral.train.rewards`), not re-tokenised
    from text."""
    score = load_reward(config, tokenizer, template)

    def reward_model(prompt_ids, completion_ids, **kwargs) -> list[float]:
        prompts = [list(ids) for ids in prompt_ids]
        return score(prompts, [list(ids) for ids in completion_ids]).tolist()

    return reward_model


def _after_training(context: Any) -> dict[str, Any]:
    """The first and last logged mean reward, for train_results.json."""
    rewards = [entry["reward"] for entry in context.log_history if "reward" in entry]
    return {"first_reward": rewards[0], "last_reward": rewards[-1]} if rewards else {}


STAGE = Stage(
    name="grpo",
    dataset_kind="prompt",
    needs_reference_model=False,  # only with grpo_beta > 0, and then TRL provides it
    make_trainer=make_trainer,
    after_training=_after_training,
)
