"""QLoRA's base model: loaded 4- or 8-bit by bitsandbytes, with a check that the device runs it.

    kwargs = quantization_kwargs(model_config, device, dtype)   # {} without quantization_bit
    AutoModelForCausalLM.from_pretrained(path, **kwargs)

Only the linear layers of the decoder blocks are quantised (transformers keeps the LM head and
embeddings in `dtype`); LoRA then trains on top (`corral.model.adapters`). A device bitsandbytes
has no kernels for is an error before loading, never a silent full-precision run.
"""

from __future__ import annotations

from typing import Any

from corral.config.fields import ModelConfig
from corral.utils.deps import require
from corral.utils.errors import ModelError
from corral.utils.log import quiet_libraries

RUN_INFO_KEY = "quantization"  # corral_run.json: how the base was quantised while training


def quantization_kwargs(config: ModelConfig, device: Any, dtype: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that load the base quantised, or {} for full precision.

    Args:
        config: quantization_bit, quantization_type and double_quantization.
        device: the torch device the model goes to (quantised weights are placed while loading).
        dtype: the compute dtype of the 4-bit matmuls and of the layers left unquantised.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
        ModelError: bitsandbytes has no backend for `device`.
    """
    bits = config.quantization_bit
    if bits is None:
        return {}
    check_backend(bits, device)
    from transformers import BitsAndBytesConfig

    if bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quantization_type,
            bnb_4bit_use_double_quant=config.double_quantization,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization, "device_map": {"": str(device)}}


def check_backend(bits: int, device: Any) -> None:
    """Raise a ModelError unless bitsandbytes can quantise `bits`-bit weights on `device`.

    It tries the quantisation kernel itself on a small tensor: a bitsandbytes build may know a
    device type (its list) and still lack the kernels for it.
    """
    quiet_libraries()  # before bitsandbytes is imported: it logs a notice while importing
    bnb = require("bitsandbytes")
    import torch

    devices = sorted(getattr(bnb, "supported_torch_devices", ()))
    problem = None
    if device.type not in devices:
        problem = f"it supports {', '.join(devices)}"
    else:
        try:
            probe = torch.randn(64, 64, device=device)
            if bits == 4:
                bnb.functional.quantize_4bit(probe, quant_type="nf4")
            else:
                bnb.functional.int8_vectorwise_quant(probe.half())
        except (RuntimeError, NotImplementedError) as err:
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if problem is not None:
        raise ModelError(
            f"quantization_bit: {bits}: bitsandbytes {bnb.__version__} cannot quantise on "
            f"device {device} ({problem}); choose another device, or remove quantization_bit "
            "to train a full-precision base"
        )


def is_quantized(model: Any) -> bool:
    """Whether `model` (or the model under a peft wrapper) was loaded quantised."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "hf_quantizer", None) is not None


def quantization_record(config: ModelConfig) -> dict[str, Any] | None:
    """What corral_run.json records about a quantised training base (None: full precision)."""
    if config.quantization_bit is None:
        return None
    record: dict[str, Any] = {"bits": config.quantization_bit, "method": "bitsandbytes"}
    if config.quantization_bit == 4:
        record.update(type=config.quantization_type, double_quantization=config.double_quantization)
    return record


def describe(record: dict[str, Any]) -> str:
    """'4-bit nf4' / '8-bit': a quantisation record in words."""
    return f"{record['bits']}-bit" + (f" {record['type']}" if record.get("type") else "")
