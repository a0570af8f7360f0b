"""Meta's original LLaMA / Llama 2 / Llama 3 checkpoints -> a Hugging Face folder.

Meta ships `params.json`, one `consolidated.NN.pth` per model-parallel rank and a tokenizer
(`tokenizer.model`: SentencePiece for LLaMA and Llama 2, tiktoken BPE for Llama 3). Shards are joined along the dimension
each layer was split on (found from the full shape `params.json` implies), q/k rows are permuted
from Meta's interleaved rotary order to transformers' rotate-half order, and GQA, the FFN size
rule (`multiple_of`, `ffn_dim_multiplier`) and `rope_theta` carry over.

    convert_meta(Path("llama-2-7b"), Path("models/llama-2-7b-hf"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from corral.data.templates import get_template
from corral.export.tokenizer_files import SPM_FILE
from corral.model.artifacts import write_run_info
from corral.utils.errors import ExportError
from corral.utils.log import get_logger

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Llama 3's pre-tokenisation split (Meta's tokenizer.py) and its count of special tokens.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_COUNT = 256
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_params(folder: Path) -> dict[str, Any]:
    """`params.json`, with a clear error when it is missing or incomplete."""
    path = folder / "params.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no params.json, so it is not a Meta checkpoint folder")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(params, dict):
        raise ExportError(f"'{path}' must hold a JSON object of the model's shape")
    missing = [k for k in ("dim", "n_layers", "n_heads", "norm_eps") if k not in params]
    if missing:
        raise ExportError(f"'{path}' lacks {', '.join(missing)}")
    return params


def ffn_hidden_size(params: dict[str, Any]) -> int:
    """The SwiGLU hidden size Meta's `FeedForward` computes from `dim`."""
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple = params.get("multiple_of", 256)
    return multiple * ((hidden + multiple - 1) // multiple)


def hf_config(params: dict[str, Any], vocab_size: int, tokenizer: Any) -> Any:
    """The `LlamaConfig` equivalent to `params.json`."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))}
    if params.get("use_scaled_rope"):  # Llama 3.1's long-context frequencies
        rope.update(
            rope_type="llama3",
            factor=params.get("rope_scaling_factor", 8.0),
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    return LlamaConfig(
        hidden_size=params["dim"],
        intermediate_size=ffn_hidden_size(params),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params["norm_eps"],
        rope_parameters=rope,
        vocab_size=vocab_size,
        max_position_embeddings=params.get("max_seq_len")
        or (8192 if vocab_size >= 128000 else 4096),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def convert_meta(input_dir: Path, out: Path) -> None:
    """Write the Meta checkpoint in `input_dir` as a Hugging Face folder into (empty) `out`.

    Raises:
        ExportError: a missing or inconsistent params.json, shard or tokenizer.
    """
    import torch
    from transformers import LlamaForCausalLM

    params = read_params(input_dir)
    tokenizer = convert_tokenizer(input_dir, out)
    vocab = params.get("vocab_size", -1)
    config = hf_config(params, vocab if vocab > 0 else len(tokenizer), tokenizer)
    state = merge_shards(load_shards(input_dir), config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as err:
        raise ExportError(f"'{input_dir}': the shards do not match params.json ({err})") from err
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    write_run_info(out, base_model=str(input_dir), template=None, extra={"converted_from": "meta"})
    get_logger().info(f"converted {input_dir} ({len(state)} tensors) into {out}")


def load_shards(input_dir: Path) -> list[dict[str, Any]]:
    """The model-parallel shards, in rank order (tensors only: `weights_only=True`)."""
    paths = sorted(input_dir.glob("consolidated.*.pth"))
    if not paths:
        raise ExportError(f"'{input_dir}' has no consolidated.NN.pth checkpoint files")
    return [_load_shard(p) for p in paths]


def _load_shard(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # weights_only refuses pickled code; a truncated download fails to unzip
        raise ExportError(
            f"'{path}' is not a checkpoint of plain tensors (torch.load with weights_only=True "
            f"refused it: {str(err).splitlines()[0]})"
        ) from None


def full_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every Meta tensor name and its unsharded shape, from the config."""
    dim, vocab = config.hidden_size, config.vocab_size
    head_dim = dim // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    ffn = config.intermediate_size
    layer = {
        "attention.wq.weight": (dim, dim),
        "attention.wk.weight": (kv, dim),
        "attention.wv.weight": (kv, dim),
        "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (ffn, dim),
        "feed_forward.w2.weight": (dim, ffn),
        "feed_forward.w3.weight": (ffn, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    shapes = {
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def merge_shards(shards: list[dict[str, Any]], config: Any) -> dict[str, Any]:
    """Join model-parallel shards and rename/permute into transformers' Llama state dict."""
    state = {}
    for name, shape in full_shapes(config).items():
        parts = [shard.get(name) for shard in shards]
        if any(p is None for p in parts):
            raise ExportError(f"checkpoint tensor '{name}' is missing from a shard")
        tensor = _join(name, parts, shape)
        if name.endswith("wq.weight"):
            tensor = unpermute_qk(tensor, config.num_attention_heads)
        elif name.endswith("wk.weight"):
            tensor = unpermute_qk(tensor, config.num_key_value_heads)
        state[_hf_name(name)] = tensor.float()
    return state


def _join(name: str, parts: list[Any], shape: tuple[int, ...]) -> Any:
    import torch

    if tuple(parts[0].shape) == shape:  # unsharded, or replicated on every rank (norms)
        return parts[0]
    for dim in range(len(shape)):
        joined = list(parts[0].shape)
        joined[dim] *= len(parts)
        if tuple(joined) == shape:
            return torch.cat(parts, dim=dim)
    raise ExportError(
        f"checkpoint tensor '{name}': {len(parts)} shard(s) of shape {tuple(parts[0].shape)} "
        f"cannot form {shape}, the shape params.json implies"
    )


def unpermute_qk(weight: Any, n_heads: int) -> Any:
    """Meta's interleaved rotary rows -> transformers' rotate-half order (per head)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_name(name: str) -> str:
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{_LAYER_KEYS[rest]}"


def convert_tokenizer(input_dir: Path, out: Path) -> Any:
    """Save Meta's tokenizer as a transformers tokenizer into `out`; return it.

    `tokenizer.model` is SentencePiece for LLaMA / Llama 2 (BOS added to text, a space prefix,
    no EOS added) and a tiktoken BPE file for Llama 3 (byte-level BPE plus 256 special tokens).
    """
    spm = input_dir / SPM_FILE
    if not spm.is_file():
        raise ExportError(f"'{input_dir}' has no {SPM_FILE} (the tokenizer Meta ships)")
    if _is_sentencepiece(spm):
        return _sentencepiece_tokenizer(spm, out)
    if _is_tiktoken(spm):
        return _tiktoken_tokenizer(spm, out)
    raise ExportError(
        f"'{spm}' is neither a SentencePiece model (LLaMA, Llama 2) nor a tiktoken BPE file "
        "(Llama 3)"
    )


def _sentencepiece_tokenizer(spm: Path, out: Path) -> Any:
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(spm, Path(tmp) / SPM_FILE)
        settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.save_pretrained(out)
    shutil.copyfile(spm, out / SPM_FILE)  # GGUF export reads the pieces' scores from it
    return tokenizer


def llama3_special_tokens(n_special: int = LLAMA3_SPECIAL_COUNT) -> list[str]:
    """Meta's Llama 3 special tokens in id order (after the BPE ranks), as its tokenizer.py has."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, n_special - 5)]
    return named + reserved


def _tiktoken_tokenizer(path: Path, out: Path) -> Any:
    """Llama 3's tiktoken file -> a fast tokenizer: the same ids as Meta's tokenizer.py."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from corral.utils.deps import require

    require("tiktoken")
    specials = llama3_special_tokens()
    backend = TikTokenConverter(
        vocab_file=str(path), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    _add_bos_on_encode(tokenizer)
    tokenizer.chat_template = get_template("llama3", tokenizer).jinja  # Meta's chat format
    tokenizer.save_pretrained(out)
    return tokenizer


def _add_bos_on_encode(tokenizer: Any) -> None:
    """Meta's Llama 3 encodes text as <|begin_of_text|> + BPE ids: the same post-processor."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.bos_token_id)],
    )


def _is_tiktoken(path: Path) -> bool:
    """A tiktoken BPE file: lines of `base64-bytes rank`."""
    import base64
    import binascii

    with open(path, "rb") as handle:
        first = handle.readline().split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except binascii.Error:
        return False
    return True


def _is_sentencepiece(path: Path) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return False
    return True
