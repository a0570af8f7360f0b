"""Prefix tuning (P-Tuning v2) and prompt tuning: learned virtual tokens instead of new weights.

    model = attach_prompt_learning(model, method)   # chosen by model.adapters.apply_method

Prefix tuning learns keys and values that every attention layer sees before the real tokens
(with `prefix_projection` they come out of a two-layer MLP, ChatGLM's P-Tuning v2); prompt
tuning learns input embeddings put in front of the prompt. Both live in peft's own forward, so
code that runs the decoder alone to save the full-vocabulary logits (`decoder_runs_alone`)
must take the model's forward instead, and neither can be merged into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.config.fields import MethodConfig
from corral.utils.errors import ModelError

# peft_type values in adapter_config.json of adapters that add virtual tokens
PROMPT_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
# corral's finetuning_type for each of the two it trains
PROMPT_METHODS = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}


def adapter_peft_type(folder: str | Path) -> str | None:
    """The peft_type an adapter folder's adapter_config.json records (LORA, PREFIX_TUNING...)."""
    config = Path(folder).expanduser() / "adapter_config.json"
    return json.loads(config.read_text()).get("peft_type")


def is_prompt_adapter(folder: str | Path) -> bool:
    """True when the adapter folder holds virtual tokens (prefix or prompt tuning), not LoRA."""
    return adapter_peft_type(folder) in PROMPT_PEFT_TYPES


def is_prompt_model(model: Any) -> bool:
    """True for a peft model whose active adapter adds virtual tokens in its forward."""
    active = getattr(model, "active_peft_config", None)
    return bool(active is not None and active.is_prompt_learning)


def decoder_runs_alone(model: Any) -> bool:
    """Whether `model.get_decoder()` gives the hidden states the model's forward would.

    corral's fast paths (label-only LM loss, shared-prompt DPO, value-head scores) run the
    decoder and skip the full logits. A distributed wrapper has no `get_decoder` (its forward
    synchronises gradients), and a prefix or prompt adapter adds its virtual tokens in peft's
    forward, which the decoder alone would skip.
    """
    return hasattr(model, "get_decoder") and not is_prompt_model(model)


def attach_prompt_learning(model: Any, method: MethodConfig, resume_adapter: str | None) -> Any:
    """`model` with a new (or, from `resume_adapter`, a continued) prefix or prompt adapter.

    Raises:
        ModelError: peft cannot put virtual tokens in front of this model (its architecture
            has no key/value cache peft knows how to prefix).
    """
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if resume_adapter:
        return pass_virtual_tokens_to_generate(
            PeftModel.from_pretrained(model, resume_adapter, is_trainable=True)
        )
    if method.finetuning_type == "prefix":
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=method.num_virtual_tokens,
            prefix_projection=method.prefix_projection,
            encoder_hidden_size=method.prefix_hidden_size or model.config.hidden_size,
        )
    else:
        config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens
        )
    try:
        return pass_virtual_tokens_to_generate(get_peft_model(model, config))
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        kind = type(model).__name__
        raise ModelError(
            f"finetuning_type: {method.finetuning_type}: peft cannot add virtual tokens to "
            f"{kind} ({err}); use finetuning_type: lora"
        ) from err


def pass_virtual_tokens_to_generate(model: Any) -> Any:
    """Make `model.generate` see a prefix/prompt adapter's virtual tokens; returns `model`.

    transformers 5.25 hands generation's KV cache to the model as `cache` (`past_key_values`
    goes in 5.40); peft 0.21's `prepare_inputs_for_generation` looks for `past_key_values`, so
    it injects the prefix under a name the model ignores (the reply is the base model's) and
    re-injects prompt tuning's embeddings at every step. Under the old name for peft and the
    new one for the model, generation matches the forward that training ran
    (tests/test_prefix.py fails when either library changes this). peft 0.22 reads the
    model's own name (`get_transformers_cache_name`), so it needs nothing.
    """
    import importlib
    import inspect

    if not is_prompt_model(model):
        return model
    peft_import_utils = importlib.import_module("peft.import_utils")
    if hasattr(peft_import_utils, "get_transformers_cache_name"):
        return model  # peft 0.22+ injects under the model's own name
    base_prepare = model.base_model_prepare_inputs_for_generation
    if "cache" not in inspect.signature(base_prepare).parameters:
        return model  # the names agree
    peft_prepare = model.prepare_inputs_for_generation

    def base_with_old_name(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model.base_model_prepare_inputs_for_generation = base_with_old_name
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.prepare_inputs_for_generation = prepare
    return model
