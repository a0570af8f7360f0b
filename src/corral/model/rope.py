"""RoPE scaling (`rope_scaling`), applied as LLaMA-Factory applies it when training.

When cutoff_len exceeds the model's max_position_embeddings, positions are stretched by
factor = ceil(cutoff_len / max_position_embeddings) and max_position_embeddings becomes
cutoff_len; otherwise the model is left as it is. The settings are given to `from_pretrained`
as config overrides and recorded in the run info, so an adapter's base is loaded with them
again for chat, serve, eval and export (a full model's config.json carries them already).

transformers 5 keeps the settings in `config.rope_parameters` (4.x: `rope_scaling`).
"""

from __future__ import annotations

import math
from typing import Any

from corral.utils.log import get_logger

RUN_INFO_KEY = "rope"  # the overrides, as recorded in corral_run.json


def rope_overrides(hf_config: Any, kind: str, context_len: int) -> dict[str, Any] | None:
    """The config overrides that let `hf_config`'s model train on `context_len` tokens.

    Args:
        hf_config: the base model's transformers config.
        kind: linear, dynamic, yarn or llama3.
        context_len: the training length (cutoff_len).

    Returns:
        {"max_position_embeddings": ..., "rope_parameters": {...}}, or None (with a note) when
        the model's context already holds context_len.
    """
    current = getattr(hf_config, "max_position_embeddings", None)
    if not current or context_len <= current:
        get_logger().warning(
            f"rope_scaling: {kind} not applied: cutoff_len {context_len} fits the model's "
            f"max_position_embeddings {current} (LLaMA-Factory disables it too)"
        )
        return None
    if kind == "dynamic":
        get_logger().warning("rope_scaling: dynamic NTK scaling may not suit fine-tuning")
    old = dict(getattr(hf_config, "rope_parameters", None) or {})
    parameters = {
        "rope_theta": old.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        "rope_type": kind,
        "factor": float(math.ceil(context_len / current)),
    }
    # transformers 5's dynamic scaling counts from max_position_embeddings itself; yarn and
    # llama3 need the pretraining length, llama3 LLaMA-Factory's frequency bands.
    if kind in ("yarn", "llama3"):
        parameters["original_max_position_embeddings"] = current
    if kind == "llama3":
        parameters.update(low_freq_factor=1.0, high_freq_factor=4.0)
    get_logger().info(
        f"rope_scaling: {kind}, factor {parameters['factor']:g}; max_position_embeddings "
        f"{current} -> {context_len}"
    )
    return {"max_position_embeddings": context_len, "rope_parameters": parameters}


def recorded_rope(run_infos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rope overrides the last of these runs trained with, or None."""
    return next((i[RUN_INFO_KEY] for i in reversed(run_infos) if i.get(RUN_INFO_KEY)), None)


def rope_record(hf_config: Any) -> dict[str, Any] | None:
    """What to record in the run info of a model trained with `hf_config`: its RoPE settings
    when they scale positions (re-applying a base's own scaling changes nothing), else None."""
    parameters = dict(getattr(hf_config, "rope_parameters", None) or {})
    if parameters.get("rope_type", "default") == "default":
        return None
    return {
        "max_position_embeddings": hf_config.max_position_embeddings,
        "rope_parameters": parameters,
    }
