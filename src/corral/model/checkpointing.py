"""Activation (gradient) checkpointing under the names this transformers release uses.

transformers 5 renamed `gradient_checkpointing_enable` / `is_gradient_checkpointing` to
`activation_checkpointing_enable` / `is_activation_checkpointing` (the old names warn and go in
v6). Checkpointing recomputes each decoder layer in backward; corral's fused ops run inside the
layers and recompute exactly, so losses and gradients do not change (tests/test_checkpointing.py).
"""

from __future__ import annotations

from typing import Any


def is_checkpointing(model: Any) -> bool:
    """Whether `model` (a peft wrapper too) recomputes its layers' activations in backward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(_unwrapped(model)), name):
            return bool(getattr(_unwrapped(model), name))
    return False


def enable_checkpointing(model: Any) -> None:
    """Turn checkpointing on (non-reentrant: frozen inputs need no `requires_grad`)."""
    target = _unwrapped(model)
    if hasattr(target, "activation_checkpointing_enable"):
        target.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _unwrapped(model: Any) -> Any:
    # a peft model forwards attributes to the transformers model below it
    return model.get_base_model() if hasattr(model, "get_base_model") else model
