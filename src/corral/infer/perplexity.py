"""Perplexity of a model on labelled token sequences, with a sliding window for long ones.

    result = perplexity(model, [(input_ids, labels), ...], window=2048, pad_id=0)
    result.perplexity == math.exp(result.nll_sum / result.tokens)

Labels follow the training convention (`corral.data.processors`): aligned with input_ids, -100
where a token is not scored, so the processors' masking (all tokens of a document; only the
replies of a conversation) is exactly what perplexity measures. Every labelled token is scored
once. A sequence longer than `window` is read in windows that start every `stride` tokens;
each token is scored in the first window that contains it, so it sees at least
`window - stride` tokens of context except near the start (Hugging Face's recipe).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from corral.model.prompt_learning import decoder_runs_alone
from corral.utils.errors import CorralError

IGNORE_INDEX = -100


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood (nats) over the scored tokens, and what it came from."""

    nll_sum: float
    tokens: int
    sequences: int
    seconds: float

    @property
    def perplexity(self) -> float:
        """exp(mean token NLL)."""
        return math.exp(self.nll_sum / self.tokens)


def windows(
    ids: list[int], labels: list[int], window: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """Cut one sequence into windows whose labels score each labelled token exactly once.

    Args:
        ids, labels: the sequence and its aligned labels (-100: not scored).
        window: the most tokens a forward pass sees.
        stride: where the next window starts, relative to the last; 1 <= stride < window
            (a stride of `window` would leave each window's first token unscored).

    Returns:
        (ids, labels) per window; labels already scored by an earlier window are -100.
    """
    if not 1 <= stride < window and len(ids) > window:
        raise CorralError(f"the perplexity stride must be in [1, {window - 1}], got {stride}")
    pieces = []
    scored_until = 0  # tokens before this index were scored by an earlier window
    for begin in range(0, max(len(ids), 1), stride):
        end = min(begin + window, len(ids))
        piece = list(labels[begin:end])
        for i in range(max(0, scored_until - begin)):
            piece[i] = IGNORE_INDEX
        pieces.append((list(ids[begin:end]), piece))
        scored_until = end
        if end == len(ids):
            break
    return pieces


def perplexity(
    model: Any,
    sequences: list[tuple[list[int], list[int]]],
    *,
    window: int,
    pad_id: int,
    batch_size: int = 4,
    stride: int | None = None,
) -> PerplexityResult:
    """Perplexity over all labelled tokens of `sequences` (see the module docstring).

    Args:
        model: a causal LM with `get_decoder()` and `get_output_embeddings()`.
        sequences: (input_ids, labels) pairs.
        window: the most tokens per forward pass (at most the model's context).
        pad_id: pads windows in a batch on the right (padding is never scored).
        batch_size: windows per forward pass.
        stride: window step for long sequences (default: half the window).

    Raises:
        CorralError: when no token is labelled.
    """
    stride = stride or max(window // 2, 1)
    pieces = [p for ids, labels in sequences for p in windows(ids, labels, window, stride)]
    pieces = [p for p in pieces if any(label != IGNORE_INDEX for label in p[1][1:])]
    if not pieces:
        raise CorralError("no token to score: every label is masked")
    started = time.perf_counter()
    nll, tokens = 0.0, 0
    pieces.sort(key=lambda p: len(p[0]))  # similar lengths share a batch: little padding
    for start in range(0, len(pieces), batch_size):
        batch_nll, batch_tokens = _batch_nll(model, pieces[start : start + batch_size], pad_id)
        nll += batch_nll
        tokens += batch_tokens
    return PerplexityResult(nll, tokens, len(sequences), time.perf_counter() - started)


def _batch_nll(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple:
    """Summed NLL and token count of one right-padded batch; the LM head runs on scored
    positions only, so no full (batch, length, vocab) logits tensor is ever built."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    device = model.device
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in batch], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
    labels = torch.tensor(
        [lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device
    )
    with torch.inference_mode():
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        if decoder_runs_alone(model):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
        else:  # virtual tokens: peft's forward; prompt tuning's come first, so keep the last
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
            logits = logits[:, :-1][scored].float()
        nll = torch.nn.functional.cross_entropy(logits, targets[scored], reduction="sum")
    return float(nll), int(scored.sum())
