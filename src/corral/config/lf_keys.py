"""LLaMA-Factory keys corral recognises but does not support (yet).

A LLaMA-Factory YAML runs unchanged: these keys produce one warning listing them instead of an
"unknown key" error. Keys of Hugging Face's `TrainingArguments` are recognised the same way.
"""

from __future__ import annotations

LLAMAFACTORY_KEYS = frozenset(
    [
        "adapter_folder",
        "cache_dir",
        "use_fast_tokenizer",
        "resize_vocab",
        "split_special_tokens",
        "add_tokens",
        "add_special_tokens",
        "new_special_tokens",
        "model_revision",
        "low_cpu_mem_usage",
        "rope_scaling",
        "shift_attn",
        "mixture_of_depths",
        "use_unsloth",
        "use_unsloth_gc",
        "enable_liger_kernel",
        "moe_aux_loss_coef",
        "use_reentrant_gc",
        "upcast_layernorm",
        "upcast_lmhead_output",
        "train_from_scratch",
        "infer_backend",
        "offload_folder",
        "use_cache",
        "hf_hub_token",
        "ms_hub_token",
        "om_hub_token",
        "print_param_status",
        "quantization_method",
        "quantization_bit",
        "quantization_type",
        "double_quantization",
        "quantization_device_map",
        "compute_dtype",
        "device_map",
        "model_max_length",
        "block_diag_attn",
        "streaming",
        "buffer_size",
        "preprocessing_batch_size",
        "eval_num_beams",
        "ignore_pad_token_for_loss",
        "eval_on_each_dataset",
        "neat_packing",
        "tool_format",
        "enable_thinking",
        "tokenized_path",
        "media_dir",
        "data_shared_file_system",
        "pure_bf16",
        "use_llama_pro",
        "use_adam_mini",
        "use_muon",
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
        "compute_accuracy",
        "disable_shuffling",
        "early_stopping_steps",
        "include_effective_tokens_per_second",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "pissa_init",
        "pissa_iter",
        "pissa_convert",
        "create_new_adapter",
        "ref_model_quantization_bit",
        "reward_model_quantization_bit",
        "ld_alpha",
        "use_galore",
        "use_apollo",
        "use_badam",
        "use_swanlab",
        "num_beams",
        "max_length",
        "length_penalty",
        "skip_special_tokens",
        "task",
        "batch_size",
        "download_mode",
        "do_train",
    ]
)

# Families of LLaMA-Factory keys that share a prefix (galore_rank, vllm_maxlen, export_dir, ...).
LLAMAFACTORY_PREFIXES = (
    "galore_",
    "apollo_",
    "badam_",
    "swanlab_",
    "image_",
    "video_",
    "audio_",
    "vllm_",
    "sglang_",
    "export_",
    "ray_",
    "kt_",
)


def is_llamafactory_key(key: str) -> bool:
    """True for keys LLaMA-Factory or Hugging Face's TrainingArguments define."""
    if key in LLAMAFACTORY_KEYS or key.startswith(LLAMAFACTORY_PREFIXES):
        return True
    return key in _training_arguments_keys()


def _training_arguments_keys() -> frozenset[str]:
    # Imported only when a key is not corral's own, so plain configs never pay for transformers.
    try:
        import dataclasses

        from transformers import TrainingArguments

        return frozenset(f.name for f in dataclasses.fields(TrainingArguments))
    except ImportError:
        return frozenset()
