"""Cross-field checks and derived defaults, one small function per concern.

Single-field checks (types, ranges, choices) happen while parsing; what needs two or more
fields lives here. Every problem is collected and raised together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.config.fields import IMPLEMENTED_STAGES, REFERENCE_FREE_LOSSES, MethodConfig
from corral.utils.errors import ConfigError

if TYPE_CHECKING:
    from corral.config.parse import CorralConfig

# Defaults that depend on the stage: packing is on for pretraining, where documents have no
# natural boundaries to pad to.
_PACKING_BY_STAGE = {"pt": True}


def check_config(config: CorralConfig) -> None:
    """Validate combinations of fields and fill derived defaults, in place.

    Raises:
        ConfigError: every problem found.
    """
    problems: list[str] = []
    for check in (
        _check_stage,
        _check_precision,
        _check_data,
        _check_method,
        _check_quantization,
        _check_pissa,
        _check_prompt_learning,
        _check_new_tokens,
        _note_other_stage_keys,
        _check_preference,
        _check_packing_and_eval,
        _check_grpo,
        _check_resume,
        _check_eval,
        _check_ppo,
        _check_distributed,
        _check_kb,
    ):
        problems.extend(check(config))
    if problems:
        raise ConfigError(problems)
    _fill_defaults(config)


def _check_stage(config: CorralConfig) -> list[str]:
    stage = config.method.stage
    if stage not in IMPLEMENTED_STAGES:
        return [
            f"stage: '{stage}' is planned but not available in this version of corral; "
            f"available: {', '.join(IMPLEMENTED_STAGES)}"
        ]
    return []


def _check_precision(config: CorralConfig) -> list[str]:
    if config.train.bf16 and config.train.fp16:
        return ["bf16 and fp16 are mutually exclusive: set at most one to true"]
    return []


def _check_data(config: CorralConfig) -> list[str]:
    data = config.data
    problems = []
    if data.val_size >= 1 and not float(data.val_size).is_integer():
        problems.append(
            f"val_size: {data.val_size} is neither a fraction below 1 nor a whole number of examples"
        )
    if data.interleave_probs is not None:
        if data.mix_strategy == "concat":
            problems.append(
                "interleave_probs is set but mix_strategy is concat; use interleave_under or interleave_over"
            )
        n_datasets = len(data.dataset or [])
        if len(data.interleave_probs) != n_datasets:
            problems.append(
                f"interleave_probs has {len(data.interleave_probs)} values for {n_datasets} datasets"
            )
        if abs(sum(data.interleave_probs) - 1.0) > 1e-6:
            problems.append(f"interleave_probs must sum to 1, got {sum(data.interleave_probs):g}")
    return problems


def _check_method(config: CorralConfig) -> list[str]:
    method = config.method
    problems = []
    if method.finetuning_type == "freeze" and method.freeze_trainable_layers == 0:
        problems.append(
            "freeze_trainable_layers: 0 would train nothing; use a positive or negative count"
        )
    if method.use_dora and method.finetuning_type != "lora":
        problems.append("use_dora needs finetuning_type: lora")
    if method.use_rslora and method.finetuning_type != "lora":
        problems.append("use_rslora needs finetuning_type: lora")
    if method.loraplus_lr_ratio is not None and method.finetuning_type != "lora":
        problems.append("loraplus_lr_ratio needs finetuning_type: lora (it sets LoRA B's lr)")
    if method.additional_target and method.finetuning_type != "lora":
        problems.append(
            "additional_target needs finetuning_type: lora (full trains every module; with "
            "freeze, name extra modules in freeze_extra_modules)"
        )
    return problems


def _check_quantization(config: CorralConfig) -> list[str]:
    bits, method = config.model.quantization_bit, config.method
    if bits is None:
        return []
    problems = []
    if bits not in (4, 8):
        problems.append(
            f"quantization_bit: {bits} is not supported; bitsandbytes quantises to 4 or 8 "
            "(leave it empty for a full-precision base)"
        )
    if method.finetuning_type != "lora":
        problems.append(
            f"quantization_bit: {bits} needs finetuning_type: lora, not "
            f"{method.finetuning_type}: quantised weights cannot be trained, so QLoRA trains "
            "LoRA adapters on the frozen quantised base"
        )
    if method.pissa_init:
        problems.append(
            "pissa_init with quantization_bit: PiSSA's start is taken from the full-precision "
            "weights, which a quantised base no longer holds; use one or the other"
        )
    return problems


# Virtual tokens are trained where a plain causal-LM forward is the loss. dpo/kto's reference
# and rm/ppo/grpo's value head would need their own handling of peft's prompt-learning forward.
PROMPT_LEARNING_STAGES = ("pt", "sft")


def _check_prompt_learning(config: CorralConfig) -> list[str]:
    method = config.method
    kind = method.finetuning_type
    if kind not in ("prefix", "prompt"):
        return (
            ["prefix_projection needs finetuning_type: prefix"] if method.prefix_projection else []
        )
    problems = []
    if method.stage not in PROMPT_LEARNING_STAGES:
        problems.append(
            f"finetuning_type: {kind} is available for stages "
            f"{', '.join(PROMPT_LEARNING_STAGES)}, not {method.stage}; use lora"
        )
    if config.data.packing:
        problems.append(
            f"packing: true with finetuning_type: {kind}: peft's virtual tokens ignore "
            "position_ids, so packed sequences would attend to each other; set packing: false"
        )
    if kind == "prompt" and method.prefix_projection:
        problems.append("prefix_projection needs finetuning_type: prefix (prompt has no MLP)")
    return problems


def _check_new_tokens(config: CorralConfig) -> list[str]:
    model = config.model
    tokens = model.new_special_tokens
    if not tokens and not model.resize_vocab:
        return []
    key = "new_special_tokens" if tokens else "resize_vocab"
    problems = []
    kind = config.method.finetuning_type
    if kind in ("prefix", "prompt"):
        problems.append(
            f"{key} with finetuning_type: {kind}: virtual tokens are all that trains, so "
            "new embedding rows would stay at their starting values; use lora or full"
        )
    if model.model_name_or_path.lower().endswith(".gguf"):
        problems.append(
            f"{key}: '{model.model_name_or_path}' is a GGUF file; add tokens to the Hugging "
            "Face model folder it was made from"
        )
    repeated = sorted({t for t in tokens or [] if tokens.count(t) > 1})
    if repeated:
        problems.append(f"new_special_tokens: {', '.join(repeated)} listed more than once")
    return problems


# PiSSA moves the principal part of each weight out of the base: a reference made by switching
# the adapter off (dpo, kto, ppo, grpo) would be the residual, not the model as loaded.
PISSA_STAGES = ("pt", "sft")


def _check_pissa(config: CorralConfig) -> list[str]:
    method = config.method
    if not method.pissa_init:
        return ["pissa_convert needs pissa_init: true"] if method.pissa_convert else []
    problems = []
    if method.finetuning_type != "lora":
        problems.append("pissa_init needs finetuning_type: lora")
    if method.stage not in PISSA_STAGES:
        problems.append(
            f"pissa_init is available for stages {', '.join(PISSA_STAGES)}, not "
            f"{method.stage} (its base keeps only the residual of each weight)"
        )
    if config.model.adapter_name_or_path and not method.create_new_adapter:
        problems.append(
            "pissa_init initialises a new adapter, but adapter_name_or_path continues training "
            "the last adapter given; set create_new_adapter: true or remove pissa_init"
        )
    if config.train.resume_from_checkpoint is not None:
        problems.append(
            "resume_from_checkpoint with pissa_init: checkpoints hold the adapter converted to "
            "plain LoRA (rank 2 x lora_rank), not the training state; start a new run"
        )
    if not method.pissa_convert:
        config.notes.append(
            "pissa_convert: false, but corral always saves the PiSSA adapter converted to plain "
            "LoRA for the original base (unconverted, it would need the residual base)"
        )
    return problems


# The stages that read each stage-specific key. Another stage ignores it, as LLaMA-Factory
# does, and says so (an sft YAML that carries them still runs).
STAGE_KEYS = {
    "pref_beta": ("dpo", "kto"),
    "pref_ftx": ("dpo", "kto"),
    "pref_loss": ("dpo",),
    "simpo_gamma": ("dpo",),
    "dpo_label_smoothing": ("dpo",),
    "ref_model": ("dpo", "kto", "ppo", "grpo"),
    "ref_model_adapters": ("dpo", "kto", "ppo", "grpo"),
    "kto_chosen_weight": ("kto",),
    "kto_rejected_weight": ("kto",),
    "reward_model": ("ppo", "grpo"),
    "reward_model_adapters": ("ppo", "grpo"),
    "reward_model_type": ("ppo", "grpo"),
    "ppo_buffer_size": ("ppo",),
    "ppo_epochs": ("ppo",),
    "ppo_score_norm": ("ppo",),
    "ppo_target": ("ppo",),
    "ppo_whiten_rewards": ("ppo",),
    "reward_funcs": ("grpo",),
    "num_generations": ("grpo",),
    "grpo_beta": ("grpo",),
}


def _note_other_stage_keys(config: CorralConfig) -> list[str]:
    method, defaults = config.method, MethodConfig()
    ignored = [
        key
        for key, stages in STAGE_KEYS.items()
        if method.stage not in stages and getattr(method, key) != getattr(defaults, key)
    ]
    if ignored:
        config.notes.append(
            f"ignoring {', '.join(ignored)}: stage {method.stage} does not read them (they "
            f"belong to {', '.join(sorted({s for k in ignored for s in STAGE_KEYS[k]}))})"
        )
    return []


# Why packing (several examples in one row) does not fit a stage's batches.
_UNPACKABLE = {
    "dpo": "a chosen and a rejected reply share a prompt and are batched as a pair",
    "kto": "each reply is batched with its KL row (its prompt with another record's reply)",
    "rm": "each reply is scored at its own last token, chosen and rejected batched as a pair",
    "ppo": "it answers prompts",
    "grpo": "it trains on prompts",
}
_LOGS_REWARDS = (
    "set val_size or eval_dataset and the validation loss and rewards are logged during training"
)
# What a stage validates with instead of do_eval's perplexity on conversations.
_VALIDATES_WITH = {
    "dpo": _LOGS_REWARDS,
    "kto": _LOGS_REWARDS,
    "rm": "set val_size or eval_dataset and the validation loss and accuracy are logged during "
    "training (the last ones go into train_results.json), or run corral eval pref",
    "ppo": "it logs the reward and kl of its rollouts instead",
    "grpo": "set val_size or eval_dataset and the validation reward is logged during training",
}


def _check_packing_and_eval(config: CorralConfig) -> list[str]:
    stage, problems = config.method.stage, []
    if config.data.packing and stage in _UNPACKABLE:
        problems.append(
            f"packing: true does not apply to stage {stage}: {_UNPACKABLE[stage]}; remove packing"
        )
    if config.eval.do_eval and stage in _VALIDATES_WITH:
        problems.append(
            f"do_eval measures perplexity on conversations; with stage {stage} "
            f"{_VALIDATES_WITH[stage]}"
        )
    return problems


def _check_preference(config: CorralConfig) -> list[str]:
    method = config.method
    if method.stage not in ("dpo", "kto"):
        return []
    problems = _check_dpo_loss(method) if method.stage == "dpo" else []
    if method.ref_model_adapters and not method.ref_model:
        problems.append(
            "ref_model_adapters are loaded on top of ref_model: set ref_model too (without "
            "it the reference is the model being trained, as loaded)"
        )
    return problems


def _check_dpo_loss(method: MethodConfig) -> list[str]:
    problems = []
    if method.dpo_label_smoothing > 0 and method.pref_loss != "sigmoid":
        problems.append(
            f"dpo_label_smoothing needs pref_loss: sigmoid (pref_loss is {method.pref_loss})"
        )
    if method.pref_loss in REFERENCE_FREE_LOSSES and (
        method.ref_model or method.ref_model_adapters
    ):
        problems.append(
            f"pref_loss: {method.pref_loss} uses no reference model; remove ref_model and "
            "ref_model_adapters (or choose sigmoid, hinge or ipo)"
        )
    return problems


def _check_grpo(config: CorralConfig) -> list[str]:
    method, generation = config.method, config.generation
    if method.stage != "grpo":
        return []
    problems = []
    if method.loraplus_lr_ratio is not None:
        # TRL's GRPOTrainer builds its own optimizer, without corral's LoRA+ groups
        problems.append("loraplus_lr_ratio is not supported with stage grpo; remove it")
    if not method.reward_funcs and not method.reward_model:
        problems.append(
            "stage grpo needs a reward: set reward_funcs (Python 'module:function', e.g. "
            "rewards:length for a rewards.py beside the config) or reward_model"
        )
    if generation.temperature == 0:
        problems.append(
            "temperature: 0 means greedy decoding, but grpo compares num_generations sampled "
            "replies per prompt, which must differ; set temperature > 0 (e.g. 1.0)"
        )
    if method.ref_model or method.ref_model_adapters:
        problems.append(
            "ref_model: grpo's reference is the model as loaded (used when grpo_beta > 0); "
            "remove ref_model and ref_model_adapters"
        )
    if (
        method.grpo_beta > 0
        and method.finetuning_type != "lora"
        and config.model.adapter_name_or_path
    ):
        # TRL reloads the reference from the base folder, without the merged adapter
        problems.append(
            "grpo_beta > 0 with finetuning_type full/freeze on top of adapter_name_or_path: "
            "the KL reference would be the base without the adapter; export the merged model "
            "and train from it, use finetuning_type: lora, or set grpo_beta: 0"
        )
    return problems


def _check_resume(config: CorralConfig) -> list[str]:
    resume = config.train.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "false", "auto"):
        config.train.resume_from_checkpoint = None if resume.lower() == "false" else resume.lower()
    return []


def _check_eval(config: CorralConfig) -> list[str]:
    ev, data = config.eval, config.data
    problems = []
    if ev.predict_with_generate and not ev.do_predict:
        problems.append("predict_with_generate only takes effect with do_predict: true")
    if ev.do_predict and not ev.predict_with_generate:
        problems.append(
            "do_predict needs predict_with_generate: true (corral predicts by generating "
            "replies; for loss and perplexity use do_eval)"
        )
    if ev.do_predict and config.method.stage != "sft":
        problems.append(
            f"do_predict generates replies to conversations, so it needs stage: sft "
            f"(stage is {config.method.stage}); use do_eval for perplexity"
        )
    if (ev.do_eval or ev.do_predict) and not (data.eval_dataset or data.val_size):
        flag = "do_eval" if ev.do_eval else "do_predict"
        problems.append(f"{flag} needs a validation set: set val_size (e.g. 0.1) or eval_dataset")
    return problems


def _check_ppo(config: CorralConfig) -> list[str]:
    if config.method.stage != "ppo":
        return []
    problems = []
    if not config.method.reward_model:
        problems.append(
            "stage: ppo needs reward_model: the output_dir of a stage: rm run (e.g. "
            "saves/rm-lora), whose scores the policy learns to raise"
        )
    if config.train.resume_from_checkpoint is not None:
        problems.append(
            "resume_from_checkpoint: stage ppo cannot resume (its value head, KL coefficient "
            "and score statistics are not restored); start a new run, e.g. with the "
            "checkpoint's adapter as adapter_name_or_path"
        )
    if config.data.val_size or config.data.eval_dataset:
        config.notes.append(
            "val_size/eval_dataset: stage ppo does not validate during training (it logs the "
            "reward and KL of its rollouts); the held-out prompts are unused"
        )
    return problems


# Stages whose training runs through CorralTrainer's own loss, tested under DeepSpeed and FSDP.
SHARDED_STAGES = ("pt", "sft")
# DeepSpeed config entries that must agree with corral's keys ("auto": the Trainer fills them).
_DS_MATCHES = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
}


def _check_distributed(config: CorralConfig) -> list[str]:
    train = config.train
    if train.fsdp_config is not None and not train.fsdp:
        return ["fsdp_config needs fsdp (e.g. fsdp: full_shard auto_wrap)"]
    if not (train.deepspeed or train.fsdp):
        return []
    engine = "deepspeed" if train.deepspeed else "fsdp"
    if train.deepspeed and train.fsdp:
        return ["deepspeed and fsdp are two ways to shard one model: set only one of them"]
    if config.method.stage not in SHARDED_STAGES:
        return [
            f"{engine} is available for stages {', '.join(SHARDED_STAGES)}, not "
            f"{config.method.stage}; remove {engine} (multi-process DDP still works)"
        ]
    if train.deepspeed:
        try:
            ds = read_deepspeed_config(train.deepspeed)
        except ConfigError as err:
            return err.problems
        return _check_deepspeed(config, ds)
    _fused_ops_off(config, "FSDP")
    problems = _after_training_sharded(config, "FSDP")
    if config.method.pissa_init:
        problems.append(_pissa_sharded("FSDP", "remove fsdp or pissa_init"))
    return problems


def _after_training_sharded(config: CorralConfig, engine: str) -> list[str]:
    """What runs on rank 0 alone after training (sft's stop check, do_eval, do_predict) would
    wait forever for the other ranks' shards of the weights: evaluate the saved folder."""
    saved = config.output.output_dir or "the output_dir"
    problems = [
        f"{flag} with {engine}: the weights are sharded across the processes; evaluate the "
        f"saved model afterwards (corral eval {command} --model/--adapter {saved}) instead"
        for flag, command in (("do_eval", "ppl"), ("do_predict", "generate"))
        if getattr(config.eval, flag)
    ]
    if config.method.stage == "sft" and config.train.stop_check_samples > 0:
        config.train.stop_check_samples = 0
        config.notes.append(
            f"stop_check_samples: 0 under {engine} (the weights are sharded across the "
            "processes); check the stop rate of the saved model with corral chat or eval generate"
        )
    return problems


def _pissa_sharded(engine: str, fix: str) -> str:
    return (
        f"pissa_init with {engine}: converting the adapter needs the whole base weights, which "
        f"{engine} shards; {fix}"
    )


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed config file `deepspeed` names, parsed.

    Raises:
        ConfigError: the file does not exist or is not a JSON object.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError([f"deepspeed: config file '{path}' does not exist"])
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"deepspeed: '{path}' is not valid JSON: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"deepspeed: '{path}' must hold a JSON object, not {type(data).__name__}"]
        )
    return data


def _check_deepspeed(config: CorralConfig, ds: dict[str, Any]) -> list[str]:
    train, path = config.train, config.train.deepspeed
    problems = []
    for ds_key, key in _DS_MATCHES.items():
        value = ds.get(ds_key, "auto")
        if value != "auto" and value != getattr(train, key):
            problems.append(
                f"deepspeed: '{path}' sets {ds_key}: {value} but {key} is "
                f'{getattr(train, key)}; set it to "auto" (filled from {key}) or make them equal'
            )
    if ds.get("train_batch_size", "auto") != "auto":
        problems.append(
            f"deepspeed: '{path}' sets train_batch_size: {ds['train_batch_size']}; set it to "
            '"auto": the global batch is per_device_train_batch_size x '
            "gradient_accumulation_steps x the processes the launcher starts"
        )
    for precision in ("bf16", "fp16"):
        enabled = _block(ds, precision).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != getattr(train, precision):
            problems.append(
                f"deepspeed: '{path}' sets {precision}.enabled: {str(enabled).lower()} but "
                f'{precision} is {str(getattr(train, precision)).lower()}; set it to "auto" '
                f"(filled from {precision}) or make them equal"
            )
    problems += _check_deepspeed_optimizer(config, ds)
    zero = _block(ds, "zero_optimization")
    if zero.get("stage") == 3:
        problems += _check_zero3(config, zero)
    return problems


def _block(mapping: Any, key: str) -> dict[str, Any]:
    """A sub-block of the DeepSpeed config ({} when absent or not a mapping)."""
    block = mapping.get(key) if isinstance(mapping, dict) else None
    return block if isinstance(block, dict) else {}


def _check_deepspeed_optimizer(config: CorralConfig, ds: dict[str, Any]) -> list[str]:
    """An optimizer block may only name DeepSpeed's Adam with every value "auto" (its CPU Adam
    is what ZeRO-Offload needs); corral's optim, learning_rate, weight_decay and
    lr_scheduler_type must stay what trains."""
    path, problems = config.train.deepspeed, []
    if "scheduler" in ds:
        problems.append(
            f"deepspeed: '{path}' has a scheduler block, which would replace lr_scheduler_type "
            "and warmup; remove it"
        )
    optimizer = _block(ds, "optimizer")
    offload = _block(_block(ds, "zero_optimization"), "offload_optimizer").get("device")
    if "optimizer" not in ds:
        if offload == "cpu" and ds.get("zero_force_ds_cpu_optimizer", True):
            problems.append(
                f"deepspeed: '{path}' offloads the optimizer to the CPU, which needs DeepSpeed's "
                'CPU Adam: add "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": '
                '"auto", "eps": "auto", "weight_decay": "auto"}} (see '
                "examples/deepspeed/ds_z3_offload_config.json)"
            )
        return problems
    params = _block(optimizer, "params")
    fixed = sorted(k for k, v in params.items() if v != "auto")
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw") or fixed:
        problems.append(
            f"deepspeed: '{path}' optimizer block must be type AdamW with every param \"auto\" "
            f"(got type {optimizer.get('type')!r}, fixed {', '.join(fixed) or 'none'}); corral's "
            "learning_rate and weight_decay set the optimizer"
        )
    if config.train.optim not in ("adamw_torch", "adamw_torch_fused"):
        problems.append(
            f"deepspeed: '{path}' names DeepSpeed's AdamW, but optim is {config.train.optim}; "
            "remove the optimizer block or use optim: adamw_torch"
        )
    if config.method.loraplus_lr_ratio is not None:
        problems.append(
            f"deepspeed: '{path}' has an optimizer block, which builds one parameter group; "
            "LoRA+ (loraplus_lr_ratio) needs its own groups: remove one of them (without "
            "offload_optimizer the block is not needed)"
        )
    return problems


def _check_zero3(config: CorralConfig, zero: dict[str, Any]) -> list[str]:
    path, problems = config.train.deepspeed, []
    if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(
            f"deepspeed: '{path}' is ZeRO-3 without stage3_gather_16bit_weights_on_model_save: "
            "true; set it, so the final save is a model folder that chat, export and serve load"
        )
    if config.method.pissa_init:
        problems.append(_pissa_sharded("ZeRO-3", "use a ZeRO-2 config or remove pissa_init"))
    _fused_ops_off(config, "ZeRO-3")
    return problems + _after_training_sharded(config, "ZeRO-3")


def _fused_ops_off(config: CorralConfig, engine: str) -> None:
    """Sharded weights are gathered only inside a module's own forward; the fused ops read
    them directly, so the modules' forwards train instead."""
    if config.train.fused_ops:
        config.train.fused_ops = False
        config.notes.append(
            f"fused_ops: off under {engine} (its sharded weights are gathered only in each "
            "module's own forward); training uses the modules' forwards"
        )


def _fill_defaults(config: CorralConfig) -> None:
    if config.data.packing is None:
        # virtual tokens cannot be packed (see _check_prompt_learning)
        prompt_learning = config.method.finetuning_type in ("prefix", "prompt")
        config.data.packing = not prompt_learning and _PACKING_BY_STAGE.get(
            config.method.stage, False
        )
    if config.method.lora_alpha is None:
        config.method.lora_alpha = float(2 * config.method.lora_rank)
    if config.output.output_dir is None:
        config.output.output_dir = f"saves/{config.method.stage}-{config.method.finetuning_type}"


def _check_kb(config: CorralConfig) -> list[str]:
    kb, problems = config.kb, []
    if kb.chunk_overlap >= kb.chunk_size:
        problems.append(
            f"chunk_overlap ({kb.chunk_overlap}) must be smaller than chunk_size ({kb.chunk_size})"
        )
    for lang in kb.embedding_languages:
        if lang not in ("en", "zh"):
            problems.append(f"embedding_languages: '{lang}' is not one of: en, zh")
    for key in ("kb_prompt_en", "kb_prompt_zh"):
        missing = [f for f in ("{passages}", "{question}") if f not in getattr(kb, key)]
        if missing:
            problems.append(f"{key}: the prompt must contain {' and '.join(missing)}")
    if kb.kb_store and not kb.kb_store.startswith(("postgresql://", "postgres://")):
        problems.append(
            f"kb_store: expected empty (the embedded store) or a postgresql:// URI, got "
            f"'{kb.kb_store}'"
        )
    return problems
