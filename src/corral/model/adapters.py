"""What gets trained: full, freeze, LoRA (DoRA / rsLoRA) or virtual tokens (prefix / prompt
tuning, `corral.model.prompt_learning`), chosen in one function.

QLoRA is LoRA on a quantised base (`quantization_bit`, applied when loading: see
`corral.model.quantize`), not a new path. peft wraps bitsandbytes' 4/8-bit linears in its own
LoRA layers; the adapters get fp32 master weights like any trainable weight, and the frozen
unquantised parts (norms, embeddings, LM head) stay in the loaded dtype, as autocast expects
(peft's `prepare_model_for_kbit_training` would make them fp32 too, for no gain here).
"""

from __future__ import annotations

import functools
from typing import Any

from corral.config.fields import MethodConfig
from corral.model.load import merge_adapters
from corral.model.prompt_learning import (
    PROMPT_METHODS,
    adapter_peft_type,
    attach_prompt_learning,
    is_prompt_adapter,
)
from corral.model.quantize import is_quantized
from corral.model.reward import SCORE_HEAD, has_value_head, reward_folder_problem
from corral.model.tokens import embedding_module_names, ties_embeddings
from corral.utils.errors import ConfigError, ModelError
from corral.utils.log import get_logger


def apply_method(
    model: Any,
    method: MethodConfig,
    adapters: list[str] | None = None,
    *,
    train_embeddings: bool = False,
) -> Any:
    """Make the right parameters trainable and return the model to train.

    Args:
        model: the loaded base model (adapters not merged).
        method: the finetuning settings.
        adapters: existing adapter folders; with LoRA all but the last are merged into the base
            and the last one continues training (`adapters_to_merge`); with full/freeze they are
            all merged.
        train_embeddings: the vocabulary grew (new_special_tokens, resize_vocab): a new LoRA
            adapter trains the embedding and LM head modules in full (modules_to_save) unless
            additional_target names its own, and freeze trains them with its chosen layers.

    Returns:
        The model to train (a `PeftModel` for LoRA). A value head is always trained: under
        LoRA peft keeps it in `modules_to_save`, under freeze it joins the trainable modules.
    """
    value_head = has_value_head(model)
    if adapters:
        merged, resumed = adapters_to_merge(method, adapters, value_head=value_head)
        if merged and is_quantized(model):
            raise ModelError(
                f"quantization_bit: cannot merge {', '.join(merged)} into a quantised base "
                "(the update would be rounded away); export the base with them merged "
                "(corral export) and train on that"
            )
        model = merge_adapters(model, merged)
        adapters = [resumed] if resumed else None
    if method.finetuning_type == "lora":
        saved = _modules_to_save(model, method, train_embeddings)
        model = _attach_lora(model, method, adapters[0] if adapters else None, saved)
        if train_embeddings:
            _skip_base_embeddings_on_save(model)
    elif method.finetuning_type in PROMPT_METHODS:
        model = attach_prompt_learning(model, method, adapters[0] if adapters else None)
    elif method.finetuning_type == "freeze":
        head = [f"{SCORE_HEAD}."] if value_head else []
        if train_embeddings:
            embeddings = embedding_module_names(model)
            get_logger().info(f"new tokens: freeze trains {', '.join(embeddings)} too")
            head += [f"{name}." for name in embeddings]
        _freeze_all_but(model, _freeze_trainable_names(model, method) + head)
    else:
        model.requires_grad_(True)
    _fp32_trainable(model)
    _log_trainable(model)
    return model


def adapters_to_merge(
    method: MethodConfig, adapters: list[str], *, value_head: bool
) -> tuple[list[str], str | None]:
    """(adapters merged into the base, the adapter that continues training or None).

    With LoRA the last adapter continues training, unless create_new_adapter asks for a new
    one, or the model has a value head and the last adapter is not a reward adapter (an sft
    adapter under a reward model is merged and a new adapter trains the head). With prefix or
    prompt tuning a last adapter of the same kind continues (LoRA adapters before it are
    merged). Full and freeze merge them all.
    """
    kind = method.finetuning_type
    if kind in PROMPT_METHODS:
        resume = (
            not method.create_new_adapter
            and adapter_peft_type(adapters[-1]) == PROMPT_METHODS[kind]
        )
        return (adapters[:-1], adapters[-1]) if resume else (list(adapters), None)
    resume = (
        kind == "lora"
        and not method.create_new_adapter
        and not is_prompt_adapter(adapters[-1])  # refused when merged: no weights to merge
        and (not value_head or reward_folder_problem(adapters[-1]) is None)
    )
    return (adapters[:-1], adapters[-1]) if resume else (list(adapters), None)


def _fp32_trainable(model: Any) -> None:
    """Give half-precision trainable weights fp32 master copies, as mixed precision expects.

    AdamW updates of lr x ~1 (1e-5 for full fine-tuning) are below bf16's resolution at typical
    weight sizes, so bf16 weights would mostly not move; the Trainer's autocast keeps the
    matmuls in half precision. Frozen weights stay as loaded (no memory is added for them).
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def lora_target_modules(model: Any, targets: list[str]) -> list[str] | str:
    """Resolve `lora_target` to peft's form, checking names against the model's modules."""
    if targets == ["all"]:
        return "all-linear"  # peft: every linear layer except the output head
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
        )
        raise ConfigError(
            [
                f"lora_target: {', '.join(missing)} not found in the model; linear layers: {', '.join(linear)}"
            ]
        )
    return targets


def _modules_to_save(model: Any, method: MethodConfig, train_embeddings: bool) -> list[str] | None:
    """additional_target, or with a grown vocabulary and none given, the embedding modules
    (LLaMA-Factory's rule for resize_vocab): LoRA alone cannot move the new rows."""
    if not train_embeddings:
        return method.additional_target
    embeddings = embedding_module_names(model)
    if method.additional_target is None:
        get_logger().info(
            f"new tokens: training {', '.join(embeddings)} in full next to LoRA (modules_to_save)"
        )
        return embeddings
    missing = [name for name in embeddings if name not in method.additional_target]
    if missing:
        get_logger().warning(
            f"additional_target leaves out {', '.join(missing)}: the new tokens' rows there "
            "keep their starting values"
        )
    return method.additional_target


def _skip_base_embeddings_on_save(model: Any) -> None:
    """Save the adapter without peft's extra copies of the grown base embeddings.

    Seeing the vocabulary grew, peft would save the base's embedding and LM head beside the
    trained copies (modules_to_save): twice their size again, for rows that loading recomputes
    exactly (`corral.model.tokens.fit_embeddings` grows the base to the saved tokenizer).
    """
    save = model.save_pretrained
    model.save_pretrained = functools.partial(save, save_embedding_layers=False)


def _attach_lora(
    model: Any, method: MethodConfig, resume_adapter: str | None, modules_to_save: list[str] | None
) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_adapter:
        return PeftModel.from_pretrained(model, resume_adapter, is_trainable=True)
    config = LoraConfig(
        # SEQ_CLS makes peft train and save the score head (modules_to_save) and keep LoRA off it
        task_type="SEQ_CLS" if has_value_head(model) else "CAUSAL_LM",
        r=method.lora_rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=lora_target_modules(model, method.lora_target),
        modules_to_save=modules_to_save,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        init_lora_weights=_lora_init(method),
        # a trained copy of tied embeddings must stay the LM head too (peft ties the copies)
        ensure_weight_tying=ties_embeddings(model)
        and bool(set(modules_to_save or []) & set(embedding_module_names(model))),
    )
    return get_peft_model(model, config)


def _lora_init(method: MethodConfig) -> bool | str:
    """peft's init_lora_weights: True (B = 0), or PiSSA by full or fast (niter) SVD."""
    if not method.pissa_init:
        return True
    return "pissa" if method.pissa_iter == -1 else f"pissa_niter_{method.pissa_iter}"


def save_initial_adapter(model: Any, folder: str) -> None:
    """Save a just-initialised PiSSA adapter, from which saves are converted to plain LoRA.

    PiSSA's adapter only gives the trained model on top of the residual base; peft turns the
    difference between the trained and this initial adapter into a LoRA for the original base
    (`save_pretrained(..., path_initial_model_for_weight_conversion=folder)`).
    """
    model.save_pretrained(folder)


def _freeze_trainable_names(model: Any, method: MethodConfig) -> list[str]:
    """Parameter-name prefixes to train: the chosen blocks' modules plus extra modules."""
    n_layers = model.config.num_hidden_layers
    count = method.freeze_trainable_layers
    if abs(count) > n_layers:
        raise ConfigError(
            [f"freeze_trainable_layers: {count}, but the model has {n_layers} layers"]
        )
    layers = range(n_layers - count, n_layers) if count > 0 else range(-count)
    modules = method.freeze_trainable_modules
    prefixes = []
    for index in layers:
        block = f"model.layers.{index}."
        prefixes += [block] if modules == ["all"] else [f"{block}{m}." for m in modules]
    prefixes += [f"{m}." for m in method.freeze_extra_modules or []]
    return prefixes


def _freeze_all_but(model: Any, prefixes: list[str]) -> None:
    matched = set()
    for name, param in model.named_parameters():
        hit = next((p for p in prefixes if name.startswith(p) or f".{p}" in f".{name}"), None)
        param.requires_grad_(hit is not None)
        if hit:
            matched.add(hit)
    unmatched = [p.rstrip(".") for p in prefixes if p not in matched]
    if unmatched:
        raise ModelError(f"freeze: no parameters match {', '.join(unmatched)}")


def _log_trainable(model: Any) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    get_logger().info(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    )
