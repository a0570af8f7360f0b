"""The arithmetic of PPO on replies, as plain tensor functions (tests check them one by one).

Every per-token tensor is (rows, T): row i holds one reply's tokens from column 0, and `mask`
is 1 on them and 0 on the padding after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GAMMA = 1.0  # a reply is one episode whose only score comes at its end: no discounting
LAM = 0.95  # GAE's bias/variance trade-off (Schulman et al. 2016; TRL's and LLaMA-Factory's)
CLIP_RANGE = 0.2  # how far one update may move a token's probability ratio
CLIP_RANGE_VALUE = 0.2  # ... and a value estimate
VALUE_COEF = 0.1  # weight of the value loss next to the policy loss
INIT_KL_COEF = 0.2
KL_HORIZON = 10_000  # rollouts over which the adaptive coefficient may change by about e


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `mask` is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """`values` scaled to unit variance over the mask (and centred, with `shift_mean`)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef x KL to the reference, plus the score on the last token.

    Args:
        scores: (rows,) the reward of each whole reply.
        kl: (rows, T) per-token log-prob of the policy minus the reference's.
        mask: (rows, T) 1 on reply tokens.
        kl_coef: the KL penalty's current weight.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = GAMMA,
    lam: float = LAM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each reply.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V.

    Returns:
        (advantages, returns), each (rows, T), zero on padding.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


@dataclass
class LossParts:
    """One minibatch's PPO loss and what is logged about it."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clip_fraction: torch.Tensor


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
) -> LossParts:
    """Clipped surrogate policy loss plus VALUE_COEF x clipped value loss, token means.

    Args:
        logps, values: the policy's log-probs and value estimates now (with gradients).
        old_logps, old_values: the same at rollout time.
        advantages, returns: from `gae` (advantages whitened).
        mask: 1 on reply tokens.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    values_clipped = old_values + (values - old_values).clamp(-CLIP_RANGE_VALUE, CLIP_RANGE_VALUE)
    value_loss = 0.5 * masked_mean(
        torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2), mask
    )
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    return LossParts(policy_loss + VALUE_COEF * value_loss, policy_loss, value_loss, clip_fraction)


class AdaptiveKL:
    """The KL coefficient, moved towards a target KL per reply (Ziegler et al. 2019).

    Each update multiplies it by 1 + clip(KL / target - 1, -0.2, 0.2) x rollouts / horizon.
    """

    def __init__(self, target: float, value: float = INIT_KL_COEF, horizon: int = KL_HORIZON):
        self.target, self.value, self.horizon = target, value, horizon

    def update(self, kl: float, rollouts: int) -> None:
        """Move the coefficient after `rollouts` replies whose mean summed KL was `kl`."""
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * rollouts / self.horizon


class RunningMoments:
    """Running mean and standard deviation of every score seen (for ppo_score_norm)."""

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, scores: torch.Tensor) -> None:
        """Fold a batch of scores into the running moments (Chan et al.'s parallel update)."""
        n = scores.numel()
        batch_mean = scores.float().mean().item()
        batch_var = scores.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` standardised by the moments so far."""
        return (scores - self.mean) / (self.var**0.5 + 1e-8)
