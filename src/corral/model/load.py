"""The one model loader under every command: `load_model(model_config)` -> (model, tokenizer).

`model_name_or_path` may be 'default' (SmolLM2-135M-Instruct, converted once), a local Hugging
Face folder, a .gguf file (de-quantized to a normal model) or a hub id. Adapter folders load on
top; for inference they are merged into the weights so generation runs at base-model speed
(with `quantization_bit` the base loads 4/8-bit and one adapter stays unmerged beside it: see
`corral.model.quantize`). An adapter folder alone brings its recorded base model and template:

    from corral.config.fields import ModelConfig
    model, tokenizer = load_model(ModelConfig(adapter_name_or_path=["saves/sft"]))

Everything is logged to stderr; stdout stays free for answers.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from corral.config.fields import ModelConfig
from corral.model.artifacts import BASE_ADAPTERS, find_run_info
from corral.model.default import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    default_model_target,
    dequantize_gguf,
)
from corral.model.prompt_learning import (
    adapter_peft_type,
    is_prompt_adapter,
    pass_virtual_tokens_to_generate,
)
from corral.model.quantize import quantization_kwargs
from corral.model.reward import prepare_value_head, wants_value_head
from corral.model.rope import recorded_rope, rope_overrides
from corral.model.tokens import add_new_special_tokens, fit_embeddings
from corral.utils.errors import MissingDependencyError, ModelError
from corral.utils.log import get_logger, quiet_libraries
from corral.utils.suggest import did_you_mean

DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "eager": "eager", "fa2": "flash_attention_2"}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from.

    Attributes:
        kind: 'default', 'folder', 'gguf' or 'hub'.
        path: the folder, the .gguf file or the hub id; for 'default' the cache folder it is
            (or will be) converted into.
        name: how messages refer to it (what the user typed).
    """

    kind: str
    path: str
    name: str


def resolve_model(name_or_path: str) -> ModelSource:
    """Decide what `model_name_or_path` names, without loading anything.

    Raises:
        ModelError: for a local path that does not exist, an adapter folder, a folder that is
            not a model, or a missing .gguf file.
    """
    if name_or_path in ("", "default"):
        return ModelSource(
            "default", str(default_model_target()), f"{DEFAULT_MODEL_NAME} (default)"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_folder(path, name_or_path)
        return ModelSource("folder", str(path), name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"model path '{name_or_path}' does not exist{_near(path)}")
        return ModelSource("gguf", str(path), name_or_path)
    if path.is_file():
        raise ModelError(
            f"model_name_or_path '{name_or_path}' is a file; pass a model folder (with "
            "config.json), a .gguf file or a hub id"
        )
    if _looks_local(name_or_path):
        raise ModelError(f"model path '{name_or_path}' does not exist{_near(path)}")
    typo = did_you_mean(name_or_path, ["default"])
    if typo:  # a one-word hub id like 'gpt2' exists, but 'defualt' is a typo
        raise ModelError(f"model '{name_or_path}' is neither a local path nor 'default'{typo}")
    return ModelSource("hub", name_or_path, name_or_path)


def _looks_local(text: str) -> bool:
    first = Path(text.split("/")[0]).expanduser()
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or ("/" in text and first.is_dir())  # 'saves/run1' where ./saves exists
    )


def _near(path: Path) -> str:
    parent = path.parent
    return did_you_mean(path.name, (p.name for p in parent.iterdir())) if parent.is_dir() else ""


def _check_model_folder(path: Path, typed: str) -> None:
    if (path / "adapter_config.json").is_file():
        raise ModelError(
            f"'{typed}' is an adapter folder, not a base model; pass it as "
            f"adapter_name_or_path={typed} (its base model is then read from its run info)"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass it directly, e.g. {path / ggufs[0]}" if ggufs else ""
        raise ModelError(
            f"model folder '{typed}' has no config.json, so it is not a Hugging Face model "
            f"folder{hint}"
        )


def pick_device(pref: str) -> Any:
    """The torch device for `pref` ('auto', 'cpu', 'cuda', 'cuda:N' or 'mps').

    Raises:
        ModelError: for an unknown name or an accelerator this machine does not have.
    """
    import torch

    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as err:
        raise ModelError(f"device '{pref}' is not a device name; use one of: {DEVICES}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(
                f"device '{pref}' was requested but CUDA is not available here (torch "
                f"{torch.__version__}); use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= count:
            raise ModelError(
                f"device '{pref}': this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device '{pref}' was requested but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device '{pref}' is not supported; use one of: {DEVICES}")
    return device


def pick_dtype(pref: str, device: Any) -> Any:
    """The weights dtype for `pref` on `device`: auto is fp32 on CPU, bf16 on GPUs with it, else fp16.

    Raises:
        ModelError: for an unknown name, or bfloat16 on a GPU without it.
    """
    import torch

    if pref == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if pref not in _DTYPES:
        raise ModelError(f"dtype '{pref}' is not supported; use one of: auto, {', '.join(_DTYPES)}")
    if pref == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("dtype bfloat16 is not supported by this GPU; use dtype=float16")
    return getattr(torch, pref)


def pick_attention(pref: str, device: Any) -> str:
    """The transformers `attn_implementation` for `flash_attn` = auto, sdpa, eager or fa2.

    Raises:
        ModelError: for an unknown name, or fa2 off CUDA.
        MissingDependencyError: for fa2 without the flash-attn package.
    """
    if pref not in _ATTENTION:
        raise ModelError(f"flash_attn '{pref}' is not one of: {', '.join(_ATTENTION)}")
    if pref == "fa2":
        if device.type != "cuda":
            raise ModelError(
                f"flash_attn=fa2 needs a CUDA GPU, but the device is {device}; use "
                "flash_attn=auto (sdpa)"
            )
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise MissingDependencyError(
                "flash_attn=fa2 needs the flash-attn package: pip install flash-attn "
                "--no-build-isolation (or use flash_attn=auto)"
            )
    return _ATTENTION[pref]


def resolve_base_for_adapters(model_config: ModelConfig) -> ModelConfig:
    """Fill what a trained folder recorded (base model, template, system prompt), where the
    user left it unset.

    With adapters and `model_name_or_path` at 'default' (or empty), the first adapter's recorded
    base model is used (its run info, else peft's `base_model_name_or_path`). An empty
    `template` and `default_system` become those the last adapter was trained with; without
    adapters, those a full or freeze fine-tuned model folder was trained with.

    Returns:
        A copy of `model_config` (the same values when nothing is recorded).

    Raises:
        ModelError: for a missing adapter folder, or a recorded local base that is gone.
    """
    adapters = model_config.adapter_name_or_path or []
    changes: dict[str, Any] = {}
    if adapters:
        check_adapter_folders(adapters)
        adapters = with_base_adapters(adapters)
        if adapters != model_config.adapter_name_or_path:
            changes["adapter_name_or_path"] = adapters
        if model_config.model_name_or_path in ("", "default"):
            changes["model_name_or_path"] = _recorded_base(adapters[0])
        trained = list(reversed(adapters))
    else:
        local = Path(model_config.model_name_or_path or "").expanduser()
        trained = [str(local)] if model_config.model_name_or_path and local.is_dir() else []
    infos = [info for info in map(find_run_info, trained) if info is not None]
    for key, recorded in (("template", "template"), ("default_system", "default_system")):
        value = next((i[recorded] for i in infos if i.get(recorded)), None)
        if getattr(model_config, key) is None and value is not None:
            changes[key] = value
    return replace(model_config, **{k: v for k, v in changes.items() if v is not None})


def with_base_adapters(adapters: list[str]) -> list[str]:
    """`adapters`, each preceded by the adapters its run merged into the base before training.

    An adapter trained on top of others (`create_new_adapter`, or the last of several adapters
    continuing) only works on a base holding them too; its run info records them, so naming
    the new adapter alone loads the whole chain. Each is listed once, in order.
    """
    chain: list[str] = []
    seen: set[Path] = set()
    for adapter in adapters:
        info = find_run_info(adapter) or {}
        for folder in [*info.get(BASE_ADAPTERS, []), adapter]:
            where = Path(folder).expanduser().resolve()
            if where not in seen:
                seen.add(where)
                chain.append(folder)
    if chain != list(adapters):
        check_adapter_folders(chain)
        get_logger().info(f"adapters (with those they were trained on): {', '.join(chain)}")
    return chain


def _recorded_base(adapter: str) -> str | None:
    base = recorded_base_model(adapter)
    if base is None or base in ("", "default"):
        return None
    if _looks_local(base) and not Path(base).expanduser().exists():
        raise ModelError(
            f"adapter '{adapter}' was trained on '{base}', which does not exist here; pass "
            "that base model as model_name_or_path"
        )
    get_logger().info(f"adapter '{adapter}' was trained on '{base}': loading it")
    return base


def recorded_base_model(adapter: str) -> str | None:
    """The base model an adapter folder says it was trained on, or None when it says nothing."""
    info = find_run_info(adapter)
    if info is not None and info.get("base_model"):
        return info["base_model"]
    import json

    peft_config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
    return peft_config.get("base_model_name_or_path") or None


def check_adapter_folders(adapters: list[str]) -> None:
    """Raise a ModelError naming the first adapter folder that is missing or not an adapter."""
    for adapter in adapters:
        path = Path(adapter).expanduser()
        if not path.is_dir():
            raise ModelError(f"adapter folder '{adapter}' does not exist{_near(path)}")
        if (path / "adapter_config.json").is_file():
            continue
        if (path / "config.json").is_file():
            hint = "it holds a full model: pass it as model_name_or_path"
        else:
            checkpoints = sorted(p.name for p in path.glob("checkpoint-*/adapter_config.json"))
            hint = (
                f"it holds checkpoints, e.g. '{path / Path(checkpoints[-1]).parent}'"
                if checkpoints
                else "is it the output_dir of a LoRA run?"
            )
        raise ModelError(f"adapter folder '{adapter}' has no adapter_config.json; {hint}")


def load_tokenizer(source_or_config: ModelSource | ModelConfig | str) -> Any:
    """The tokenizer of a model, or of a config's last adapter when it saved one (with a
    config's new_special_tokens added).

    Args:
        source_or_config: a `ModelSource`, a `ModelConfig` or a `model_name_or_path` string.

    Raises:
        ModelError: when the model cannot be found or read.
    """
    quiet_libraries()
    if isinstance(source_or_config, ModelConfig):
        config = resolve_base_for_adapters(source_or_config)
        saved = _adapter_tokenizer_dir(config.adapter_name_or_path)
        if saved is not None:
            tokenizer = _from_pretrained("AutoTokenizer", saved, config.trust_remote_code)
        else:
            tokenizer = _base_tokenizer(config.model_name_or_path, config.trust_remote_code)
        if config.new_special_tokens:
            add_new_special_tokens(tokenizer, config.new_special_tokens)
        return tokenizer
    return _base_tokenizer(source_or_config)


def _base_tokenizer(source: ModelSource | str, trust: bool = False) -> Any:
    if isinstance(source, str):
        source = resolve_model(source)
    if source.kind == "gguf":
        return dequantize_gguf(Path(source.path))[1]
    return _from_pretrained("AutoTokenizer", _local_or_hub(source), trust, source)


def load_model(
    model_config: ModelConfig,
    *,
    for_training: bool = False,
    value_head: bool | None = None,
    context_len: int | None = None,
) -> tuple[Any, Any]:
    """Load the base model (and adapters) that `model_config` names, with its tokenizer.

    Args:
        model_config: model, adapters, device, dtype and attention settings.
        for_training: return the base model with adapters unmerged (training attaches them)
            instead of merged into the weights.
        value_head: load it with a scalar `score` head in place of the LM head (a reward
            model, `AutoModelForSequenceClassification` with one label; see
            `corral.model.reward`); a head the folder lacks starts at zero. None: as the
            folders say (a reward model folder or adapter gets its head).
        context_len: the training length (cutoff_len), which `rope_scaling` stretches the
            model's positions to; None (inference): the RoPE settings the adapters recorded.

    Returns:
        (model, tokenizer); the model on its device, in eval mode.

    Raises:
        ModelError: when the model or an adapter cannot be found, read or combined.
    """
    quiet_libraries()
    config = resolve_base_for_adapters(model_config)
    adapters = config.adapter_name_or_path or []
    source = resolve_model(config.model_name_or_path)
    if value_head is None:
        value_head = wants_value_head(config)
    if value_head and source.kind == "gguf":
        raise ModelError(
            f"'{source.name}' is a GGUF file; a reward model (a score head) loads from a Hugging "
            "Face folder: pass the model folder the GGUF was made from"
        )
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    attention = pick_attention(config.flash_attn, device)
    bits = f", {config.quantization_bit}-bit base" if config.quantization_bit else ""
    get_logger().info(
        f"loading {source.name} on {device} ({str(dtype).removeprefix('torch.')}{bits})"
    )
    if source.kind == "gguf" and config.rope_scaling is not None and context_len is not None:
        raise ModelError(
            f"rope_scaling: '{source.name}' is a GGUF file; train with RoPE scaling from the "
            "Hugging Face model folder it was made from"
        )
    quantized = quantization_kwargs(config, device, dtype)
    if quantized and source.kind == "gguf":
        raise ModelError(
            f"quantization_bit: '{source.name}' is a GGUF file; load the Hugging Face model "
            "folder it was made from to quantise it with bitsandbytes"
        )
    if source.kind == "gguf":
        model, tokenizer = dequantize_gguf(
            Path(source.path), dtype=dtype, attn_implementation=attention
        )
    else:
        model = _from_pretrained(
            "AutoModelForSequenceClassification" if value_head else "AutoModelForCausalLM",
            _local_or_hub(source),
            config.trust_remote_code,
            source,
            dtype=dtype,
            attn_implementation=attention,
            **({"num_labels": 1} if value_head else {}),
            **(_rope_for(config, source, adapters, context_len) or {}),
            **quantized,
        )
        tokenizer = None
    # as loaded, before saving rewrites it: a causal LM folder gets a new score head
    new_head = not any(
        a.endswith("ForSequenceClassification") for a in model.config.architectures or []
    )
    if not quantized:  # quantised weights are placed on the device while loading
        model.to(device)
    saved = _adapter_tokenizer_dir(adapters)
    if saved is not None:
        tokenizer = _from_pretrained("AutoTokenizer", saved, config.trust_remote_code)
    elif tokenizer is None:
        tokenizer = load_tokenizer(source)
    _fit_vocabulary(model, tokenizer, config, grown_by_adapter=saved is not None)
    if value_head:
        prepare_value_head(model, tokenizer, new_head=new_head)
    if not for_training and quantized:
        model = _attach_unmerged(model, adapters, source)
    elif not for_training:  # a last prefix/prompt adapter stays attached: no weights to merge
        model = merge_adapters(model, adapters, source, keep_last_prompt=True)
    return model.eval(), tokenizer


def _fit_vocabulary(
    model: Any, tokenizer: Any, config: ModelConfig, *, grown_by_adapter: bool
) -> None:
    """Add new_special_tokens, then give the model a row per token (see `corral.model.tokens`).

    Before any adapter is attached: an adapter trained with new tokens saved the grown
    tokenizer and embedding rows (modules_to_save) that only fit a grown base.
    """
    if config.new_special_tokens:
        add_new_special_tokens(tokenizer, config.new_special_tokens)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        if config.resize_vocab:
            get_logger().info(
                f"resize_vocab: the model has {rows:,} embedding rows for the tokenizer's "
                f"{len(tokenizer):,} tokens; nothing to resize"
            )
        return
    if config.new_special_tokens or config.resize_vocab or grown_by_adapter:
        fit_embeddings(model, tokenizer)


def _attach_unmerged(model: Any, adapters: list[str], source: ModelSource) -> Any:
    """A quantised base keeps its adapter beside it: merging would round the adapter's update
    into 4/8-bit weights. One adapter only (a chain would have to be merged)."""
    if len(adapters) > 1:
        raise ModelError(
            f"quantization_bit: a quantised base takes one adapter, not {len(adapters)} "
            f"({', '.join(adapters)}); export them merged (corral export) and load that"
        )
    return attach_adapter(model, adapters[0], source) if adapters else model


def _rope_for(
    config: ModelConfig, source: ModelSource, adapters: list[str], context_len: int | None
) -> dict[str, Any] | None:
    """RoPE config overrides: rope_scaling's for training, else those the adapters recorded."""
    if config.rope_scaling is not None and context_len is not None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(
            _local_or_hub(source), trust_remote_code=config.trust_remote_code
        )
        return rope_overrides(hf_config, config.rope_scaling, context_len)
    return recorded_rope([info for info in map(find_run_info, adapters) if info])


def merge_adapters(
    model: Any,
    adapters: list[str],
    source: ModelSource | None = None,
    *,
    keep_last_prompt: bool = False,
) -> Any:
    """Merge adapter folders into `model`'s weights, in order.

    Args:
        keep_last_prompt: a last prefix or prompt adapter (virtual tokens, nothing to merge)
            is attached instead, and the model returned is a peft model.

    Raises:
        ModelError: naming the adapter, the model it was trained on and the one loaded, when
            they do not fit together, or naming a prefix/prompt adapter that would have to be
            merged.
    """
    check_adapter_folders(adapters)
    for index, adapter in enumerate(adapters):
        if is_prompt_adapter(adapter):
            if keep_last_prompt and index == len(adapters) - 1:
                return pass_virtual_tokens_to_generate(attach_adapter(model, adapter, source))
            raise ModelError(unmergeable_prompt_adapter(adapter))
        model = attach_adapter(model, adapter, source).merge_and_unload()
        get_logger().info(f"merged adapter {adapter}")
    return model


def unmergeable_prompt_adapter(adapter: str) -> str:
    """Why a prefix/prompt adapter cannot be merged into the weights, and what to do instead."""
    return (
        f"adapter '{adapter}' is {adapter_peft_type(adapter)} (learned virtual tokens that the "
        "model attends to, not a change of its weights), so it cannot be merged into the "
        "model; use it as the last adapter_name_or_path of chat or serve, or train with "
        "finetuning_type: lora to get a mergeable adapter"
    )


def attach_adapter(model: Any, adapter: str, source: ModelSource | None = None) -> Any:
    """`model` with one adapter folder attached, unmerged (a peft `PeftModel`).

    Raises:
        ModelError: naming the adapter, the model it was trained on and the one loaded, when
            they do not fit together (e.g. a shape mismatch).
    """
    from peft import PeftModel

    loaded = source.name if source else getattr(model, "name_or_path", "the model")
    recorded = recorded_base_model(adapter)
    if recorded is not None and source is not None and not _same_model(recorded, source):
        get_logger().warning(f"adapter '{adapter}' was trained on '{recorded}', not {loaded}")
    recorded = recorded or "an unrecorded base model"
    try:
        return PeftModel.from_pretrained(model, adapter)
    except pickle.UnpicklingError as err:
        raise ModelError(_not_plain_tensors(adapter)) from err
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        shapes = [line for line in lines if line.startswith("size mismatch")]
        reason = (shapes or lines or [type(err).__name__])[0]
        raise ModelError(
            f"adapter '{adapter}' was trained on '{recorded}' and does not fit the base "
            f"model '{loaded}' ({reason}); pass '{recorded}' as model_name_or_path"
        ) from err


def _same_model(recorded: str, source: ModelSource) -> bool:
    if source.kind == "default":
        return recorded in ("", "default", source.path)
    if source.kind == "hub":
        return recorded == source.path
    return Path(recorded).expanduser().resolve() == Path(source.path).resolve()


def _adapter_tokenizer_dir(adapters: list[str] | None) -> str | None:
    # Training saves the tokenizer (with the chat template it trained) beside the adapter.
    if adapters and (Path(adapters[-1]).expanduser() / "tokenizer_config.json").is_file():
        return str(Path(adapters[-1]).expanduser())
    return None


def _local_or_hub(source: ModelSource) -> str:
    if source.kind == "default":
        return str(default_model_dir())
    if source.kind == "hub" and _hub_offline():
        # transformers would still ask the network for some files (and retry for about a
        # minute and a half without one), so offline a hub id becomes its cached local folder.
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source.path, local_files_only=True)
        except (OSError, ValueError) as err:
            reason = "it is not in the local Hugging Face cache and the hub is not reachable"
            raise _hub_error(source, reason) from err
    return source.path


def _from_pretrained(
    auto_class: str,
    path: str,
    trust_remote_code: bool,
    source: ModelSource | None = None,
    **kwargs: Any,
) -> Any:
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError as err:  # transformers loads .bin with weights_only=True
        raise ModelError(_not_plain_tensors(path)) from err
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not trust_remote_code and "custom code" in reason:
            raise ModelError(
                f"'{path}' needs its own Python code to load, and corral runs no code from a "
                "model folder unless you set trust_remote_code: true; set it only for a model "
                "whose code you have read and trust"
            ) from err
        if source is not None and source.kind == "hub":
            raise _hub_error(source, reason) from err
        raise ModelError(f"could not load '{path}': {reason}") from err


def _not_plain_tensors(path: str) -> str:
    return (
        f"'{path}' holds a pickled checkpoint with more than plain tensors; corral loads only "
        "safetensors or weights-only pickles, so loading it could run code hidden in the file. "
        "If you trust its origin, convert it to safetensors first"
    )


def _hub_error(source: ModelSource, reason: str) -> ModelError:
    return ModelError(
        f"could not load '{source.name}' from the Hugging Face hub (offline or not found); "
        f"download it elsewhere and pass the local folder as model_name_or_path ({reason})"
    )


def _hub_offline() -> bool:
    # Read here, not from huggingface_hub, which reads HF_HUB_OFFLINE once when imported.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False
