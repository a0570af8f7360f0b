"""Leaner training ops for Llama-style models: fewer full-size temporaries, less saved memory.

    counts = fuse_for_training(model)   # after apply_method, before training
    unfuse(model)                       # the modules' own forwards again

Three swaps, all exact up to float rounding (tests/test_lean_training.py):

- MLP: `down_proj(silu(gate) * up)` as separate autograd nodes keeps four (tokens x
  intermediate) tensors alive per layer until backward: gate, silu(gate), up and their product
  (the input the down projection and its LoRA A need for their gradients). At SmolLM2's sizes
  that is over half of all activation memory. `SwiGLUDown` keeps only gate and up and
  recomputes the product in backward (elementwise ops, no matmul): a third less activation
  memory, fewer kernels.
- LoRA linears: peft computes `base(x) + lora_B(lora_A(x)) * scaling`, writing four
  (tokens x out) tensors; `torch.addmm(base(x), x @ A.T, B.T, alpha=scaling)` writes two.
- RMSNorm: the plain module keeps its input and the normalised rows for backward and writes
  three temporaries; `RMSNormFn` keeps the input and one scale per row, recomputing the rest.

They apply to bias-free `nn.Linear`s and peft LoRA `Linear`s with one active vanilla adapter
and no dropout, in Llama-style MLPs (gate/up/down, SiLU); DoRA, dropout, quantised or merged
layers keep their own forwards, and so does everything run without gradients (inference).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class SwiGLUDown(torch.autograd.Function):
    """y = down(silu(gate) * up) + scale * (silu(gate) * up) @ A.T @ B.T, saving gate and up."""

    @staticmethod
    def forward(ctx, gate, up, weight, lora_a, lora_b, scale):  # noqa: D102 - autograd API
        shape = gate.shape
        gate, up = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])
        # computed in the activations' dtype: under bf16 autocast, or with fp32 adapters on a
        # bf16 model (peft's default), the weights are cast, as the unfused modules would be
        weight_c, lora_a_c, lora_b_c = _cast(gate.dtype, weight, lora_a, lora_b)
        product = F.silu(gate) * up
        out = product @ weight_c.t()
        product_a = None
        if lora_a is not None:
            product_a = product @ lora_a_c.t()
            out.addmm_(product_a, lora_b_c.t(), alpha=scale)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, product_a)
        ctx.scale, ctx.shape = scale, shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd API
        gate, up, weight, lora_a, lora_b, product_a = ctx.saved_tensors
        weight_c, lora_a_c, lora_b_c = _cast(gate.dtype, weight, lora_a, lora_b)
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).to(gate.dtype)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        product = silu * up  # recomputed: this is the memory the op saves
        grad_product = grad_out @ weight_c
        grad_weight = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad_out.t() @ product).to(weight.dtype)
        if lora_a is not None:
            grad_out_b = grad_out @ lora_b_c  # (tokens, rank)
            grad_product.addmm_(grad_out_b, lora_a_c, alpha=ctx.scale)
            if ctx.needs_input_grad[4]:
                grad_b = (grad_out.t() @ product_a).mul_(ctx.scale).to(lora_b.dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (grad_out_b.t() @ product).mul_(ctx.scale).to(lora_a.dtype)
        del product
        grad_up = grad_product * silu
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        grad_gate = grad_product.mul_(up).mul_(sig * (1 + gate * (1 - sig)))
        shape = ctx.shape
        return (
            grad_gate.reshape(shape),
            grad_up.reshape(shape),
            grad_weight,
            grad_a,
            grad_b,
            None,
        )


class RMSNormFn(torch.autograd.Function):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32, saving x and 1/rms per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: D102 - autograd API
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd API
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1])
            grad_weight = rows.sum(0).to(weight.dtype)
        grad_normed = (grad_out * weight).float()
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed))
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


def _fused_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return self._unfused_forward(x)
    return RMSNormFn.apply(x, self.weight, self.variance_epsilon)


def _is_rms_norm(module: Any) -> bool:
    # Llama-style: weight * normalised (not Gemma's 1 + weight), with variance_epsilon
    return type(module).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and (
        isinstance(getattr(module, "weight", None), torch.nn.Parameter)
    )


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(dtype) for t in tensors]


def linear_parts(module: Any) -> tuple[Any, Any, Any, float] | None:
    """(weight, lora_A, lora_B, scale) of a bias-free linear or vanilla LoRA linear, else None."""
    if type(module) is torch.nn.Linear:
        return (module.weight, None, None, 0.0) if module.bias is None else None
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.bias is not None:
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None  # several adapters, or DoRA and other variants: keep peft's forward
    name = active[0]
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    return base.weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def _fused_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    parts = linear_parts(self.down_proj)
    if parts is None or not torch.is_grad_enabled():  # changed since fusing, or inference
        return self._unfused_forward(x)
    weight, lora_a, lora_b, scale = parts
    return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), weight, lora_a, lora_b, scale)


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    parts = linear_parts(self)
    if parts is None or args or kwargs or not torch.is_grad_enabled():
        return self._unfused_forward(x, *args, **kwargs)
    weight, lora_a, lora_b, scale = parts
    flat = x.reshape(-1, x.shape[-1])
    base = flat @ weight.t()
    low_rank = flat.to(lora_a.dtype) @ lora_a.t()
    if low_rank.dtype == base.dtype:  # same dtype, or both cast by autocast
        out = torch.addmm(base, low_rank, lora_b.t(), alpha=scale)
    else:  # fp32 adapters on a bf16/fp16 model without autocast: peft's arithmetic
        out = base + (low_rank @ lora_b.t() * scale).to(base.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_for_training(model: Any) -> dict[str, int]:
    """Swap in the fused forwards wherever they apply.

    Returns:
        How many modules changed: {"mlp": ..., "lora": ..., "norm": ...} (zeros for other
        architectures).
    """
    counts = {"mlp": 0, "lora": 0, "norm": 0}
    for module in model.modules():
        if hasattr(module, "_unfused_forward"):
            continue
        if _is_rms_norm(module):
            _swap(module, _fused_norm_forward)
            counts["norm"] += 1
        elif _is_swiglu_mlp(module) and linear_parts(module.down_proj) is not None:
            _swap(module, _fused_mlp_forward)
            counts["mlp"] += 1
        elif hasattr(module, "base_layer") and linear_parts(module) is not None:
            _swap(module, _fused_lora_forward)
            counts["lora"] += 1
    return counts


def unfuse(model: Any) -> None:
    """Restore the modules' own forwards."""
    for module in model.modules():
        if hasattr(module, "_unfused_forward"):
            module.forward = module._unfused_forward
            del module._unfused_forward


def _swap(module: Any, forward: Any) -> None:
    module._unfused_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _is_swiglu_mlp(module: Any) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if not all(hasattr(module, n) for n in names):
        return False
    act = module.act_fn
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
