"""LLaMA-Factory (and Hugging Face TrainingArguments) keys corral recognises but does not use.

A LLaMA-Factory YAML must never train something other than what it says. So each such key is
one of two kinds:

- harmless: it cannot change what is trained, on what data, with what memory or what comes out
  (logging, reporting, hub tokens and uploads, multi-process launch details, dataloader
  plumbing). One warning lists the ones a config sets, and the run goes on.
- refused: it would change one of those. The config is an error naming the key, why corral
  cannot honour it, and what to do instead. A key that is left at its LLaMA-Factory default
  (e.g. `quantization_bit: null`, `use_unsloth: false`) changes nothing and is not refused.

Keys corral implements are its own config fields (see `fields.py`) or aliases in `parse.py`
(`neat_packing`, `enable_liger_kernel`, `use_cpu`, ...), so they never reach this module. A
TrainingArguments key named nowhere here is refused: corral passes only its own fields to the
Trainer (see `train/trainer.py`).
"""

from __future__ import annotations

from typing import Any

HARMLESS_KEYS = frozenset(
    [
        # loading, caches and tokens
        "cache_dir",
        "use_fast_tokenizer",  # corral always uses the fast tokenizer (it needs offsets)
        "low_cpu_mem_usage",
        "offload_folder",
        "hf_hub_token",
        "ms_hub_token",
        "om_hub_token",
        "download_mode",
        "trust_remote_code_for_datasets",
        "use_cache",
        "model_max_length",  # the tokenizer's limit; corral cuts at cutoff_len
        # data plumbing that keeps the data and its order
        "preprocessing_batch_size",
        "tokenized_path",
        "data_shared_file_system",
        "streaming",
        "buffer_size",
        "media_dir",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "remove_unused_columns",
        "label_names",
        "length_column_name",
        # logging, reporting, checkpoints' extras
        "print_param_status",
        "include_effective_tokens_per_second",
        "include_num_input_tokens_seen",
        "include_tokens_per_second",
        "compute_accuracy",
        "eval_on_each_dataset",
        "logging_dir",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_on_each_node",
        "log_level",
        "log_level_replica",
        "disable_tqdm",
        "run_name",
        "project",
        "use_swanlab",
        "skip_memory_metrics",
        "debug",
        "save_only_model",
        "save_strategy",
        "save_on_each_node",
        "save_safetensors",
        "enable_jit_checkpoint",
        "restore_callback_states_from_checkpoint",
        "eval_strategy",
        "evaluation_strategy",
        "eval_delay",
        "eval_on_start",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "eval_accumulation_steps",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "bf16_full_eval",
        "fp16_full_eval",
        "push_to_hub",
        "hub_token",
        "hub_private_repo",
        "hub_model_id",
        "hub_strategy",
        "hub_always_push",
        "hub_revision",
        "export_hub_model_id",
        "max_length",  # generation: max_new_tokens, which corral always sets, takes precedence
        # distributed launch plumbing (the launcher's, not what is trained)
        "ddp_timeout",
        "ddp_backend",
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "local_rank",
        "average_tokens_across_devices",
        # same maths, another speed or memory trade
        "use_reentrant_gc",
        "torch_empty_cache_steps",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "full_determinism",
        "tf32",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing_kwargs",
        # stage and task switches corral reads from the command itself
        "do_train",
        # multimodal settings: corral trains text-only models, where they do nothing
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
        "enable_thinking",
    ]
)
HARMLESS_PREFIXES = ("swanlab_", "trackio_", "image_", "video_", "audio_", "ray_")

_QLORA = (
    "only the trained model is quantised (quantization_bit); a quantised reference or reward "
    "model is not built"
)
_DISTRIBUTED = (
    "accelerate's own plugin settings are not read; launch with corral train --nproc-per-node "
    "or torchrun, and shard with the deepspeed or fsdp/fsdp_config keys"
)
_VOCAB = (
    "corral adds tokens as special tokens only (new_special_tokens: one id each, never split); "
    "to learn new tokens from a corpus, run corral vocab extend and train the folder it writes"
)
_OPTIMIZER = "corral trains with AdamW (or `optim`) and its own settings"
_GENERATION = "corral decodes greedily or by sampling (temperature, top_p, top_k)"

# Key -> why corral cannot honour it (and what to do instead).
REFUSED_KEYS = {
    # model loading and architecture
    "model_revision": "corral loads the model folder as it is; check out that revision locally",
    "adapter_folder": "name the adapter folders in adapter_name_or_path",
    "shift_attn": "S^2-attention (shift_attn) is not built",
    "mixture_of_depths": "mixture-of-depths conversion is not built",
    "train_from_scratch": "corral fine-tunes pretrained weights; it does not re-initialise them",
    "moe_aux_loss_coef": "mixture-of-experts models are not supported",
    "upcast_layernorm": "corral trains fp32 master weights under autocast; remove the key",
    "upcast_lmhead_output": "corral computes the LM head loss in fp32 already; remove the key",
    "pure_bf16": "corral trains half-precision weights with fp32 master copies; use bf16: true",
    "use_unsloth": "Unsloth's kernels are not used; corral fuses its own (fused_ops)",
    "use_unsloth_gc": "Unsloth's checkpointing is not used; use gradient_checkpointing: true",
    "block_diag_attn": "use packing: true (corral's packing always attends within each example)",
    "infer_backend": "corral chat and eval use transformers; serve other backends with "
    "`corral serve --backend llamacpp|vllm`",
    # vocabulary
    "split_special_tokens": _VOCAB,
    "add_tokens": _VOCAB,
    # quantisation and distributed training
    "quantization_device_map": "corral places the quantised model on one device (device)",
    "ref_model_quantization_bit": _QLORA,
    "reward_model_quantization_bit": _QLORA,
    "compute_dtype": "corral chooses the compute dtype from bf16/fp16",
    "device_map": "corral places the model on one device (device: cpu, cuda, cuda:N)",
    "accelerator_config": _DISTRIBUTED,
    "parallelism_config": _DISTRIBUTED,
    # data
    "disable_shuffling": "corral shuffles (by length groups) with `seed`; set seed to change it",
    "dataloader_drop_last": "corral trains on every example, the last partial batch too",
    "dataloader_in_order": "corral's batch order comes from `seed`",
    "train_sampling_strategy": "corral groups rows by length (packing: random); remove the key",
    "data_seed": "corral orders the data with `seed`; set seed instead",
    "ignore_data_skip": "corral resumes exactly where it stopped; remove the key",
    "auto_find_batch_size": "set per_device_train_batch_size",
    # methods and optimisers
    "use_llama_pro": "LLaMA Pro block expansion is not built",
    "use_adam_mini": _OPTIMIZER,
    "use_muon": _OPTIMIZER,
    "use_galore": _OPTIMIZER,
    "use_apollo": _OPTIMIZER,
    "use_badam": _OPTIMIZER,
    "optim_args": _OPTIMIZER,
    "optim_target_modules": _OPTIMIZER,
    "adam_beta1": _OPTIMIZER,
    "adam_beta2": _OPTIMIZER,
    "adam_epsilon": _OPTIMIZER,
    "lr_scheduler_kwargs": "corral's schedules take no extra arguments; choose lr_scheduler_type",
    "label_smoothing_factor": "label smoothing is not built",
    "neftune_noise_alpha": "NEFTune noise is not built",
    "ld_alpha": "LD-DPO is not built; remove ld_alpha",
    "early_stopping_steps": "early stopping is not built; set max_steps or num_train_epochs",
    "load_best_model_at_end": "corral saves the last model; pick a checkpoint-N folder instead",
    "metric_for_best_model": "corral saves the last model; pick a checkpoint-N folder instead",
    "greater_is_better": "corral saves the last model; pick a checkpoint-N folder instead",
    # evaluation and generation
    "task": "name the benchmark folder with task_dir (corral eval mc)",
    "batch_size": "use per_device_eval_batch_size",
    "num_beams": _GENERATION,
    "eval_num_beams": _GENERATION,
    "length_penalty": _GENERATION,
    "skip_special_tokens": "corral always strips special tokens from replies",
    "ignore_pad_token_for_loss": "corral never trains on padding",
    # export
    "export_quantization_bit": "GPTQ export is not built; export a .gguf with --quant q8_0/q4_0",
    "export_quantization_dataset": "GPTQ export is not built",
    "export_quantization_nsamples": "GPTQ export is not built",
    "export_quantization_maxlen": "GPTQ export is not built",
    "export_legacy_format": "corral writes safetensors only",
}
REFUSED_PREFIXES = {
    "galore_": _OPTIMIZER,
    "apollo_": _OPTIMIZER,
    "badam_": _OPTIMIZER,
    "vllm_": "vLLM settings are not read; serve with `corral serve --backend vllm`",
    "sglang_": "SGLang is not supported",
    "kt_": "KTransformers is not supported",
}

# LLaMA-Factory's defaults for keys whose default means "off": set to these, a refused key
# changes nothing, so a YAML written out in full still runs.
_OFF_VALUES = (None, False, "", "none", "None", 0, "false", "False")
_DEFAULTS = {
    "ignore_pad_token_for_loss": True,
    "skip_special_tokens": True,
    "num_beams": 1,
    "eval_num_beams": None,
    "length_penalty": 1.0,
    "export_legacy_format": False,
    "quantization_device_map": None,
    "train_sampling_strategy": "random",
    "data_seed": None,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "moe_aux_loss_coef": None,
    "infer_backend": "huggingface",
}


def classify(key: str, value: Any) -> str | None:
    """How corral treats a key that is not its own.

    Returns:
        "harmless" (listed in one warning), "refused" (an error, see `refusal`), or None for a
        key that neither LLaMA-Factory nor TrainingArguments defines (an unknown key).
    """
    if key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES):
        return "harmless"
    reason = refusal(key)
    if reason is None and key not in _training_arguments_keys():
        return None
    if _is_off(key, value):
        return "harmless"
    return "refused"


def refusal(key: str) -> str | None:
    """Why corral cannot honour `key` (None for keys it does not refuse by name)."""
    if key in REFUSED_KEYS:
        return REFUSED_KEYS[key]
    for prefix, reason in REFUSED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    return None


def refusal_message(key: str, value: Any) -> str:
    """The config error for a refused key, naming it and its value."""
    reason = refusal(key) or (
        "a Hugging Face TrainingArguments option corral does not pass to the Trainer"
    )
    return f"{key}: {value!r} would change what is trained or produced, and corral cannot: {reason}"


def _is_off(key: str, value: Any) -> bool:
    if key in _DEFAULTS:
        default = _DEFAULTS[key]
        return value == default or (default is None and value in _OFF_VALUES)
    return value in _OFF_VALUES or value in ({}, [])


def _training_arguments_keys() -> frozenset[str]:
    # Imported only when a key is not corral's own, so plain configs never pay for transformers.
    try:
        import dataclasses

        from transformers import TrainingArguments

        return frozenset(f.name for f in dataclasses.fields(TrainingArguments))
    except ImportError:
        return frozenset()
