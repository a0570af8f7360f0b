"""Proximal policy optimisation against a reward model: corral's own short loop.

    corral train examples/ppo_lora.yaml          # stage: ppo, reward_model: saves/rm-lora

TRL removed its PPOTrainer in 1.13, so this stage is written here, on the shared trainer: the
Trainer's optimizer, scheduler, callbacks, logging and checkpoint saving, with `train` replaced
by the PPO loop. One PPO step, with LLaMA-Factory 0.9.5's meaning of each key:

1. rollouts: per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size
   prompts (the `prompt` data kind: rendered as chat renders them), answered in micro-batches
   of per_device_train_batch_size by the chat engine, so replies stop on the template's stop
   tokens; max_new_tokens, temperature, top_p and top_k are the generation keys;
2. scores from the reward (`reward_model`), one per reply; ppo_score_norm standardises them by
   the running mean and deviation of all scores so far;
3. per reply token, the policy's and the reference's log-probs and the value head's estimate;
   reward = -kl_coef x (logp - ref_logp), plus the score on the last token (ppo_whiten_rewards
   scales these to unit variance); GAE (gamma 1, lambda 0.95) gives whitened advantages and
   returns (`corral.train.ppo_math`);
4. ppo_epochs passes over the rollouts in minibatches of per_device_train_batch_size x
   gradient_accumulation_steps (ppo_buffer_size minibatches a pass, shuffled), one optimizer
   step each: clipped policy loss + 0.1 x clipped value loss;
5. the adaptive KL controller moves kl_coef (from 0.2) towards ppo_target.

The learning-rate schedule steps once per PPO step and max_steps counts PPO steps. The
reference is the one dpo uses (`build_reference`: LoRA with its adapter off, else a frozen
copy, or ref_model). The value head is a Linear on the policy's last hidden state, saved as
value_head.safetensors next to the model; the folder is otherwise a normal model/adapter
folder. Logged per step: loss, reward (mean raw score), kl (mean summed KL per reply),
kl_coef, policy_loss, value_loss, clip_fraction and reply_tokens; with plot_loss, the
reward and KL curves go to training_reward.png and training_kl.png.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from corral.config import CorralConfig
from corral.data.processors import IGNORE_INDEX, split_prompt
from corral.infer.batching import GREEDY_BELOW
from corral.infer.engine import ChatEngine
from corral.model.checkpointing import enable_checkpointing
from corral.train.loss import token_logps
from corral.train.ppo_math import (
    AdaptiveKL,
    RunningMoments,
    gae,
    masked_whiten,
    ppo_loss,
    token_rewards,
)
from corral.train.preference import Reference, build_reference
from corral.train.rewards import Reward, load_reward
from corral.train.stages import Stage
from corral.train.trainer import CorralTrainer
from corral.utils.errors import CorralError

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class Rollouts:
    """One micro-batch of prompts with their replies, right-padded, and per-token numbers."""

    ids: torch.Tensor  # (rows, width) prompt + reply + padding
    labels: torch.Tensor  # the reply tokens; -100 elsewhere
    scores: torch.Tensor  # (rows,) raw scores
    logps: torch.Tensor  # (rows, T) at rollout time
    ref_logps: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def collate_prompts(features: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """A batch of prompt-kind examples -> their prompt ids (the reference replies unused)."""
    return {"prompts": [split_prompt(f["input_ids"], f["labels"])[0] for f in features]}


class PPOTrainer(CorralTrainer):
    """The shared trainer with `train` replaced by the PPO loop (see the module docstring).

    Args:
        config: the resolved config (ppo_* keys, generation settings, the model).
        reward: scores (prompt ids, reply ids) batches.
        reference: the reference policy's source.
        value_head: a Linear(hidden, 1), trained with the policy.
        **kwargs: `CorralTrainer`'s arguments.
    """

    def __init__(
        self,
        *,
        config: CorralConfig,
        reward: Reward,
        reference: Reference,
        value_head: Any,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.config, self.reward, self.reference = config, reward, reference
        self.value_head = value_head.to(self.args.device)
        if reference.model is not None:
            reference.model.to(self.args.device)
        self.engine = ChatEngine(
            config.model, config.generation, model=self.model, tokenizer=self.processing_class
        )
        self.kl_control = AdaptiveKL(config.method.ppo_target)
        self.score_moments = RunningMoments()
        self.micro_batches = self.args.gradient_accumulation_steps
        # greedy rollouts (temperature 0) are scored as if sampled at 1
        self.temperature = config.generation.temperature
        if self.temperature < GREEDY_BELOW:
            self.temperature = 1.0

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:  # noqa: D102
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint is not None:  # checks.py refuses it first; this guards the API
            raise CorralError("stage ppo cannot resume_from_checkpoint; start a new run")
        if self.args.world_size > 1:  # rollouts and updates are not synchronised across ranks
            raise CorralError("stage ppo runs on one device; launch it without torchrun")
        loader = self.get_train_dataloader()
        per_step = self.micro_batches * self.config.method.ppo_buffer_size
        max_steps = self.args.max_steps
        if max_steps <= 0:
            max_steps = math.ceil(self.args.num_train_epochs * max(len(loader) // per_step, 1))
        self._start(max_steps)
        if self.config.train.gradient_checkpointing:  # as the Trainer's train() would
            enable_checkpointing(self.model)
        prompts = _cycle(loader, self.state, len(loader))
        started, losses = time.time(), []
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            logs = self._ppo_step([next(prompts) for _ in range(per_step)])
            logs["learning_rate"] = self._get_learning_rate()  # the rate this step used
            self.lr_scheduler.step()  # once per PPO step, as LLaMA-Factory schedules it
            losses.append(logs["loss"])
            self.state.global_step += 1
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            self._log_and_save(logs)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        metrics = {
            "train_runtime": round(time.time() - started, 4),
            "train_loss": sum(losses) / max(len(losses), 1),
            "epoch": self.state.epoch,
        }
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _start(self, max_steps: int) -> None:
        """The Trainer's optimizer (plus the value head) and scheduler, and a fresh state."""
        from transformers.trainer_callback import ExportableState, TrainerState

        self.create_optimizer()
        self.optimizer.add_param_group(
            {"params": list(self.value_head.parameters()), "weight_decay": 0.0}
        )
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        stateful = self.callback_handler.callbacks + [self.control]
        self.state = TrainerState(
            stateful_callbacks=[cb for cb in stateful if isinstance(cb, ExportableState)]
        )
        self.state.compute_steps(self.args, max_steps)
        self.state.init_training_references(self, max_steps, self.args.num_train_epochs, None)
        self.model_wrapped = self.model

    def _log_and_save(self, logs: dict[str, float]) -> None:
        if self.control.should_log:
            self.log(logs)
            self.control.should_log = False
        self.control.should_evaluate = False  # a PPO step has no validation loss to compute
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _ppo_step(self, prompt_batches: list[list[list[int]]]) -> dict[str, float]:
        """Roll out, score and estimate advantages for the prompts; then optimise on them."""
        rollouts = [self._rollout(prompts) for prompts in prompt_batches]
        raw = torch.cat([r.scores for r in rollouts])
        if self.config.method.ppo_score_norm:
            self.score_moments.update(raw)
        self._advantages(rollouts)
        stats: dict[str, list[float]] = {}
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        params = model_params + list(self.value_head.parameters())
        order = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        for _ in range(self.config.method.ppo_epochs):
            shuffled = torch.randperm(len(rollouts), generator=order).tolist()
            for start in range(0, len(shuffled), self.micro_batches):
                minibatch = [rollouts[i] for i in shuffled[start : start + self.micro_batches]]
                for key, value in self._optimise(minibatch, params).items():
                    stats.setdefault(key, []).append(value)
        kl = torch.cat([((r.logps - r.ref_logps) * r.mask).sum(dim=1) for r in rollouts])
        logs = {key: sum(values) / len(values) for key, values in stats.items()}
        logs.update(
            reward=raw.mean().item(),
            kl=kl.mean().item(),
            kl_coef=self.kl_control.value,
            reply_tokens=torch.cat([r.mask.sum(dim=1) for r in rollouts]).mean().item(),
        )
        self.kl_control.update(logs["kl"], len(raw))
        return logs

    @torch.no_grad()
    def _rollout(self, prompts: list[list[int]]) -> Rollouts:
        """Generate replies (eval mode, as chat), score them, and record per-token numbers."""
        self.model.eval()
        replies = [reply.token_ids for reply in self.engine.generate_ids(prompts)]
        scores = self.reward(prompts, replies).to(self.args.device, torch.float32)
        ids, labels = _right_pad(prompts, replies, self.engine.pad_id(), self.args.device)
        with self.accelerator.autocast():
            logps, values, mask = self._forward(self.model, ids, labels, with_values=True)
            ref_logps = self._reference_logps(ids, labels)
        self.model.train()
        return Rollouts(ids, labels, scores, logps, ref_logps, values, mask)

    def _reference_logps(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reference.model is not None:
            return self._forward(self.reference.model, ids, labels)[0]
        with self.model.disable_adapter():
            return self._forward(self.model, ids, labels)[0]

    def _forward(
        self, model: Any, ids: torch.Tensor, labels: torch.Tensor, with_values: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(log-probs, values or None, mask), each (rows, T), of the reply tokens of `ids`.

        The head runs only on reply positions; right padding needs no attention mask under
        causal attention (see `CorralTrainer.compute_loss`).
        """
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        positions = targets != IGNORE_INDEX
        selected = hidden[:, :-1][positions]  # the states that predict each reply token
        counts = positions.sum(dim=1).tolist()
        head = model.get_output_embeddings()
        # the log-probs of the distribution replies were sampled from (logits / temperature)
        logps = _rows(token_logps(selected, targets[positions], head, self.temperature), counts)
        values = None
        if with_values:
            values = _rows(self.value_head(selected.float()).squeeze(-1), counts)
        mask = _rows(torch.ones(sum(counts), device=ids.device), counts)
        return logps, values, mask

    def _advantages(self, rollouts: list[Rollouts]) -> None:
        """Per-token rewards, GAE and whitening over the whole step's rollouts, in place."""
        width = max(r.mask.shape[1] for r in rollouts)
        stack = lambda name: torch.cat([_widen(getattr(r, name), width) for r in rollouts])  # noqa: E731
        mask, scores = stack("mask"), torch.cat([r.scores for r in rollouts])
        if self.config.method.ppo_score_norm:
            scores = self.score_moments.normalise(scores)
        kl = stack("logps") - stack("ref_logps")
        rewards = token_rewards(scores, kl, mask, self.kl_control.value)
        if self.config.method.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, stack("values"), mask)
        advantages = masked_whiten(advantages, mask)
        start = 0
        for r in rollouts:
            rows, own = r.mask.shape
            r.advantages = advantages[start : start + rows, :own]
            r.returns = returns[start : start + rows, :own]
            start += rows

    def _optimise(self, minibatch: list[Rollouts], params: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step on a minibatch (its micro-batches' gradients accumulated)."""
        self.model.train()
        totals = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        for r in minibatch:
            with self.accelerator.autocast():
                logps, values, _ = self._forward(self.model, r.ids, r.labels, with_values=True)
            parts = ppo_loss(logps, r.logps, r.advantages, values, r.values, r.returns, r.mask)
            self.accelerator.backward(parts.loss / len(minibatch))
            for key in totals:
                totals[key] += getattr(parts, key).item() / len(minibatch)
            self.meter.real_tokens += int((r.ids != self.engine.pad_id()).sum())
            self.meter.trained_tokens += int(r.mask.sum())
        if self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model or adapter as every stage saves it, and value_head.safetensors beside."""
        from safetensors.torch import save_file

        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            state = {
                k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()
            }
            save_file(state, folder / VALUE_HEAD_FILE)


def _cycle(loader: Any, state: Any, batches_per_epoch: int) -> Iterator[list[list[int]]]:
    """Prompt micro-batches epoch after epoch, keeping state.epoch up to date."""
    epoch, seen = 0, 0
    while True:
        for holder in (loader, getattr(loader, "batch_sampler", None)):
            sampler = getattr(holder, "sampler", holder)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            seen += 1
            state.epoch = seen / batches_per_epoch
            yield batch["prompts"]
        epoch += 1


def _right_pad(
    prompts: list[list[int]], replies: list[list[int]], pad: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of prompt + reply rows, right-padded; labels mark the reply tokens."""
    pairs = list(zip(prompts, replies, strict=True))
    ids = pad_sequence([torch.tensor(p + r) for p, r in pairs], True, padding_value=pad)
    labels = [torch.tensor([IGNORE_INDEX] * len(p) + r) for p, r in pairs]
    labels = pad_sequence(labels, True, padding_value=IGNORE_INDEX)
    return ids.to(device), labels.to(device)


def _rows(flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Flat per-token values, `counts` per row, as a (rows, max count) zero-padded tensor."""
    return pad_sequence(list(flat.split(counts)), batch_first=True)


def _widen(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def make_trainer(*, config: CorralConfig, template: Any, model: Any, **kwargs: Any) -> PPOTrainer:
    """The ppo stage's trainer for `model` (after `apply_method`), with its reward, reference
    and a fresh value head (zero-initialised, so every first estimate is 0)."""
    hidden = model.get_input_embeddings().embedding_dim  # (a wrapped LM head may hide it)
    value_head = torch.nn.Linear(hidden, 1, dtype=torch.float32)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return PPOTrainer(
        config=config,
        reward=load_reward(config, kwargs["processing_class"], template),
        reference=build_reference(config, model),
        value_head=value_head,
        model=model,
        **kwargs,
    )


def _after_training(context: Any) -> dict[str, Any]:
    """The last logged reward, KL and losses, for train_results.json."""
    keys = ("reward", "kl", "kl_coef", "policy_loss", "value_loss")
    last: dict[str, Any] = {}
    for entry in context.log_history:
        last.update({f"ppo_{k}": entry[k] for k in keys if k in entry})
    return last


STAGE = Stage(
    name="ppo",
    dataset_kind="prompt",
    needs_reference_model=True,
    # the policy keeps its LM head; its value head is this module's own (`make_trainer`)
    needs_value_head=False,
    make_collator=lambda pad_token_id: collate_prompts,
    make_trainer=make_trainer,
    after_training=_after_training,
    plot_metrics=("reward", "kl"),
)
