"""Reward functions for examples/grpo_lora.yaml: score replies against the dataset's reply.

GRPO calls each function with keyword arguments (see corral.train.grpo): `completions` (the
sampled reply texts), `reference` (the dataset's reply to the same prompt) and more; it returns
one float per reply. Name them in a config as `reward_funcs: examples.grpo_rewards:overlap`
(run from the repository root), or copy this file beside your config as rewards.py and write
`reward_funcs: rewards:overlap`.
"""

from __future__ import annotations

import re


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlap(completions: list[str], reference: list[str], **kwargs) -> list[float]:
    """Unigram F1 between each reply and the dataset's reply (0..1): say what it says."""
    scores = []
    for reply, target in zip(completions, reference, strict=True):
        said, wanted = _words(reply), _words(target)
        if not said or not wanted:
            scores.append(0.0)
            continue
        common = sum(min(said.count(w), wanted.count(w)) for w in set(said))
        precision, recall = common / len(said), common / len(wanted)
        scores.append(0.0 if common == 0 else 2 * precision * recall / (precision + recall))
    return scores


def concise(completions: list[str], reference: list[str], **kwargs) -> list[float]:
    """1 for a reply no longer than twice the dataset's reply, falling to 0 at four times."""
    scores = []
    for reply, target in zip(completions, reference, strict=True):
        ratio = len(_words(reply)) / max(len(_words(target)), 1)
        scores.append(min(1.0, max(0.0, 2.0 - ratio / 2)))
    return scores
