"""The reward a reward model folder gives a reply: what ppo and grpo score with.

`reward_model` names an rm output folder (see `corral.model.reward`). The reward model was
trained on conversations as the chat template renders them, scored at their last token, which is
whatever the template writes after a reply's end-of-turn token (ChatML's "<|im_end|>\\n": the
newline). A generated reply stops at its end-of-turn token, so the template's text after it is
appended before scoring: the head reads the position it was trained at.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from corral.config import CorralConfig
from corral.data.templates import Template, encode_turns, stop_token_ids
from corral.utils.errors import CorralError

# (prompt ids, reply ids) of a batch -> (batch,) scores; the reply ends with its stop token
# when it stopped.
Reward = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


def load_reward(config: CorralConfig, tokenizer: Any, template: Template | None = None) -> Reward:
    """The reward that `reward_model` names: an rm output folder scoring prompt + reply.

    reward_model_type lora: an rm adapter, loaded on its recorded base (reward_model_adapters
    merged first) as a second model (LLaMA-Factory swaps it onto the policy's own base
    instead: less memory, the same scores); full: a whole reward model folder
    (reward_model_adapters on top). Its tokenizer must be the policy's, since it scores the
    policy's token ids as they are. With `template`, a reply that stopped gets the template's
    text after the end-of-turn token, as the reward model saw it in training.
    """
    from corral.model.reward import load_reward_model

    method = config.method
    folder = Path(method.reward_model).expanduser()
    is_adapter = (folder / "adapter_config.json").is_file()
    if folder.is_dir() and is_adapter != (method.reward_model_type == "lora"):
        kind, fix = ("an adapter", "lora") if is_adapter else ("a whole model", "full")
        raise CorralError(
            f"reward_model '{method.reward_model}' is {kind} but reward_model_type is "
            f"{method.reward_model_type}; set reward_model_type: {fix}"
        )
    reward_model = load_reward_model(
        method.reward_model, adapters=method.reward_model_adapters, device=config.model.device
    )
    if reward_model.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise CorralError(
            f"reward_model '{method.reward_model}' has another tokenizer than the policy; train "
            "the reward model on the policy's base model (or one with the same tokenizer)"
        )
    finish = _reply_ending(template, tokenizer) if template is not None else (lambda r: r)

    def reward(prompts: list[list[int]], replies: list[list[int]]) -> torch.Tensor:
        return reward_model.score([p + finish(r) for p, r in zip(prompts, replies, strict=True)])

    return reward


def _reply_ending(template: Template, tokenizer: Any) -> Callable[[list[int]], list[int]]:
    """reply ids -> the reply as training rendered it: cut after its first stop token, followed
    by what the template writes after that token (unchanged when it did not stop)."""
    stops = set(stop_token_ids(template, tokenizer))
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = encode_turns(template, tokenizer, probe)[-1][1]
    first = next((k for k, t in enumerate(rendered) if t in stops), None)
    suffix = rendered[first + 1 :] if first is not None else []

    def finish(reply: list[int]) -> list[int]:
        end = next((k for k, t in enumerate(reply) if t in stops), None)
        return reply if end is None else reply[: end + 1] + suffix

    return finish
