"""Write a merged Llama model as a GGUF file for llama.cpp, with the `gguf` package.

Tensors follow llama.cpp's layout (convert_hf_to_gguf.py): names from gguf's tensor map, and
the q/k projections permuted back from Hugging Face's rotate-half rotary order to Meta's
interleaved one. 1-D tensors (norms) stay f32; 2-D ones take the requested type. The tokenizer
and the trained chat template go into the metadata (gguf_vocab.py).

Quantisations are those the `gguf` package can write itself: f32, f16, bf16, q8_0 and q4_0.
K-quants (q4_k, ...) are read-only there; make them from an f16 file with llama.cpp's
`llama-quantize`. With q4_0 the token embedding (the output head too, when tied) is kept at
q8_0, as llama.cpp does for its most sensitive tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.export.gguf_vocab import add_tokenizer
from corral.export.merge import MergedModel
from corral.utils.errors import ExportError
from corral.utils.log import get_logger

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
_ROPE_TYPES = ("default", "linear", "llama3")


def write_gguf(merged: MergedModel, path: Path, tokenizer_dir: Path, quant: str) -> None:
    """Write `merged` as a GGUF file at `path`.

    Args:
        merged: from `load_merged`.
        path: the file to write.
        tokenizer_dir: the exported tokenizer (`save_tokenizer`), read for the vocabulary.
        quant: one of `QUANTS`.

    Raises:
        ExportError: an architecture, rope scaling or quantisation GGUF export cannot handle.
    """
    import gguf

    config = merged.model.config
    check_architecture(config)
    if quant not in QUANTS:
        raise ExportError(f"--quant '{quant}' is not supported; choose one of: {', '.join(QUANTS)}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(merged.base_model or merged.source.name).name)
    _add_hyperparameters(writer, config, quant)
    add_tokenizer(writer, merged, tokenizer_dir, vocab_rows=config.vocab_size)
    tensors = llama_tensors(merged.model.state_dict(), config) + _rope_tensors(config)
    for name, tensor in tensors:
        data, qtype = encode_tensor(name, tensor, quant)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_architecture(config: Any) -> None:
    """Raise an ExportError naming the architecture when GGUF export cannot write it."""
    found = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if found not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support the {found} architecture; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Export a Hugging Face folder (--format hf) "
            "and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") not in _ROPE_TYPES:
        raise ExportError(
            f"GGUF export does not support rope scaling type '{rope['rope_type']}' yet "
            f"(supported: {', '.join(_ROPE_TYPES)}); use llama.cpp's convert_hf_to_gguf.py"
        )


def _rope(config: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
    rope = dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _rope_tensors(config: Any) -> list[tuple[str, Any]]:
    """Llama 3.1's long-context rope as llama.cpp reads it: per-frequency divisors in a
    `rope_freqs` tensor (the formula of transformers' `_compute_llama3_parameters`)."""
    import math

    import numpy as np

    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return []
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    divisors = []
    for wavelength in 2 * math.pi / freqs:
        if wavelength < old_context / high:  # high frequencies: unchanged
            divisors.append(1.0)
        elif wavelength > old_context / low:  # low frequencies: slowed by `factor`
            divisors.append(factor)
        else:  # in between: interpolated
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.asarray(divisors, dtype=np.float32))]


def _add_hyperparameters(writer: Any, config: Any, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_qk(weight: Any, n_head: int) -> Any:
    """Hugging Face's rotate-half q/k rows back to Meta's interleaved (llama.cpp's) order."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def llama_tensors(state_dict: dict[str, Any], config: Any) -> list[tuple[str, Any]]:
    """(GGUF name, fp32 numpy array) for each weight, q/k permuted, a tied head left out."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_qk(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_qk(tensor, config.num_key_value_heads)
        out.append((name, tensor.detach().float().cpu().numpy()))
    return out


def encode_tensor(name: str, array: Any, quant: str) -> tuple[Any, Any]:
    """The tensor's bytes (or floats) in the type `quant` asks for, and that type.

    Norms and other 1-D tensors stay f32. A tensor whose rows do not split into whole
    quantisation blocks falls back to f16, as llama.cpp's converter does.
    """
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or quant == "f32":
        return array.astype(np.float32), types.F32
    if quant == "f16":
        return array.astype(np.float16), types.F16
    qtype = {"bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        qtype = types.Q8_0
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.quants.QuantError:
        get_logger().warning(f"{name}: rows of {array.shape[-1]} do not fit {quant}; f16 instead")
        return array.astype(np.float16), types.F16
