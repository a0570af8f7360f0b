"""Causal-LM loss computed only where labels exist, without the full logits tensor.

The vocabulary-sized logits dominate memory at small model sizes (4 x 512 x 49,152 floats is
400 MB for SmolLM2) and most of them belong to prompt tokens that are never trained. We select
the positions that have a label, then run the LM head and cross-entropy chunk by chunk; the
gradient of each chunk is computed in the forward pass (the loss is the last node of the graph),
so no chunk's logits outlive its loop iteration and nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # 50 MB of fp32 logits at a 49k vocabulary: a smaller peak, same speed


def causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Any,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions, divided by `num_items`.

    Args:
        hidden: (batch, seq, hidden) final hidden states.
        labels: (batch, seq) aligned with the inputs (the model shifts), -100 where untrained.
        head: the output projection (`model.get_output_embeddings()`).
        num_items: the normaliser: labelled tokens across the whole (accumulated) batch, so that
            gradient accumulation gives the same gradients as one large batch. Defaults to this
            batch's labelled tokens.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    targets = targets[mask]
    denominator = num_items if num_items is not None else max(int(targets.numel()), 1)
    weight = _plain_linear_weight(head)
    if weight is None:  # a head that is not a plain bias-free linear (e.g. with LoRA on it)
        return _chunked_loss(selected, targets, head) / denominator
    return _FusedLinearCrossEntropy.apply(selected, weight, targets, torch.as_tensor(denominator))


def _plain_linear_weight(head: Any) -> torch.Tensor | None:
    active = head
    # peft keeps a trainable copy of modules in `modules_to_save`; use the active copy.
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapter"):
        adapter = head.active_adapter
        adapter = adapter[0] if isinstance(adapter, list | tuple) else adapter
        # nn.ModuleDict has no .get()
        active = (
            head.modules_to_save[adapter]  # noqa: SIM401
            if adapter in head.modules_to_save
            else head.original_module
        )
    if type(active) is torch.nn.Linear and active.bias is None:
        return active.weight
    return None


def _chunked_loss(selected: torch.Tensor, targets: torch.Tensor, head: Any) -> torch.Tensor:
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), CHUNK_TOKENS):
        logits = head(selected[start : start + CHUNK_TOKENS]).float()
        total = total + F.cross_entropy(
            logits, targets[start : start + CHUNK_TOKENS], reduction="sum"
        )
    return total


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum CE(h @ W.T, y) / n, with dL/dh and dL/dW computed chunk-wise in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator):  # noqa: D102 - autograd API
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        compute = _compute_dtype(weight)
        weight_c = weight.to(compute)
        with torch.autocast(device, enabled=False):
            for start in range(0, targets.numel(), CHUNK_TOKENS):
                h = hidden[start : start + CHUNK_TOKENS].to(compute)
                y = targets[start : start + CHUNK_TOKENS]
                logits = (h @ weight_c.t()).float()
                log_z = torch.logsumexp(logits, dim=-1)
                total += (log_z - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                # d(sum CE)/d(logits) = softmax - one_hot, computed in place to save memory.
                grad_logits = logits.sub_(log_z[:, None]).exp_()
                grad_logits[torch.arange(y.numel(), device=y.device), y] -= 1
                grad_logits = grad_logits.to(compute)
                if need_h:
                    grad_hidden[start : start + CHUNK_TOKENS] = grad_logits @ weight_c
                if need_w:  # a matmul in the compute dtype (bf16 on GPUs), summed in fp32
                    grad_weight += (grad_logits.t() @ h).float()
        scale = 1.0 / denominator.to(torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - autograd API
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_output * scale
        dh = grad_hidden * factor.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * factor).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on (fp32 master weights,
    bf16 compute), else the weight's own; logits, softmax and the sums stay fp32."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def label_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: Any | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of its labelled tokens, and how many there are.

    Like `causal_lm_loss`, the head runs only on labelled positions, chunk by chunk. A frozen
    head (LoRA, freeze) computes each token's gradient in the forward pass too; a trained
    one keeps each chunk's log-softmax for backward (see `token_logps`).

    Args:
        hidden: (rows, seq, hidden) final hidden states, or (rows, seq, vocab) logits when
            `head` is None.
        labels: (rows, seq) aligned with the inputs (the model shifts), -100 where untrained.
        head: the output projection, or None when `hidden` already holds logits.

    Returns:
        (logps, counts): two (rows,) tensors; logps in fp32.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[mask]
    per_token = token_logps(hidden[:, :-1][mask], targets[mask], head)
    sums = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
    return sums, mask.sum(dim=1)


def token_logps(
    selected: torch.Tensor, targets: torch.Tensor, head: Any | None, temperature: float = 1.0
) -> torch.Tensor:
    """The log-probability of each target token, the head run chunk by chunk.

    Args:
        selected: (n, hidden) hidden states at the positions that predict `targets`, or
            (n, vocab) logits when `head` is None.
        targets: (n,) token ids.
        head: the output projection, or None.
        temperature: the logits are divided by it (the distribution sampling drew from).

    Returns:
        (n,) fp32 log-probs, differentiable.
    """
    weight = None if head is None else _plain_linear_weight(head)
    if weight is not None and not weight.requires_grad:
        return _FrozenHeadLogps.apply(selected, weight, targets, temperature)
    pieces = [selected.new_zeros(0, dtype=torch.float32)]
    for start in range(0, targets.numel(), CHUNK_TOKENS):
        chunk = selected[start : start + CHUNK_TOKENS]
        logits = (chunk if head is None else head(chunk)).float()
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(1, targets[start : start + CHUNK_TOKENS, None]).squeeze(1)
        pieces.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(pieces)


class _FrozenHeadLogps(torch.autograd.Function):
    """log softmax(h @ W.T / T)[y] per token, for a head that is not trained (LoRA, freeze).

    d logp / d h = (one_hot(y) - softmax) @ W / T is the same whatever the loss does with the
    log-prob afterwards, so it is computed chunk by chunk in the forward pass and backward only
    scales it by each token's incoming gradient: no chunk's logits outlive its iteration (the
    autograd version keeps every chunk's log-softmax, n x vocab floats, until backward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):  # noqa: D102 - autograd API
        compute = _compute_dtype(weight)
        weight_c = weight.to(compute)
        logps = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), CHUNK_TOKENS):
                y = targets[start : start + CHUNK_TOKENS]
                logits = (hidden[start : start + CHUNK_TOKENS].to(compute) @ weight_c.t()).float()
                if temperature != 1.0:
                    logits /= temperature
                # log_softmax is one fused kernel; logsumexp then a subtraction took 1.5x as long
                log_probs = torch.log_softmax(logits, dim=-1)
                del logits
                logps[start : start + y.numel()] = log_probs.gather(1, y[:, None]).squeeze(1)
                if grad_hidden is None:
                    continue
                probs = log_probs.exp_().to(compute)  # in place: one buffer
                step = (weight_c[y] - probs @ weight_c) / temperature
                grad_hidden[start : start + y.numel()] = step.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return logps

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - autograd API
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None
        return grad_hidden * grad_output[:, None].to(grad_hidden.dtype), None, None, None
