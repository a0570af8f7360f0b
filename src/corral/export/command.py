"""`corral export`: merge adapters into the base model and write it for other tools.

    corral export --adapter saves/sft --output exports/sft            # Hugging Face folder
    corral export --adapter saves/sft --output sft.q8_0.gguf --quant q8_0     # llama.cpp
    corral export --model default --output smol.f16.gguf              # any model, no adapter

The base model and chat template an adapter was trained with come with it. Each merge is
checked (merged logits equal base + adapter logits to 1e-4 in fp32) before anything is written;
the output appears only when complete, and an existing one is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from corral.config.cli_args import add_config_args, config_from_args
from corral.utils.errors import ConfigError
from corral.utils.log import get_logger

FLAGS = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--device": "device",
}
FORMATS = ("hf", "gguf")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")  # = gguf_file.QUANTS, kept light for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Export flags; model flags are documented by their config fields."""
    from corral.config.fields import all_fields

    table = all_fields()
    add_config_args(parser)
    for flag, key in FLAGS.items():
        kwargs = {"nargs": "+"} if key == "adapter_name_or_path" else {}
        parser.add_argument(
            flag, dest=key, default=None, help=table[key][1].metadata["help"], **kwargs
        )
    parser.add_argument(
        "--output",
        default=None,
        help="The folder (hf) or .gguf file (gguf) to write (or export_dir in the config).",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="hf: a merged Hugging Face folder; gguf: one file for llama.cpp/Ollama. "
        "Default: gguf when --output ends in .gguf, else hf.",
    )
    parser.add_argument(
        "--quant",
        choices=QUANTS,
        default="f16",
        help="GGUF tensor type (default f16). f32/f16 reproduce transformers' greedy tokens; "
        "q8_0 is half the size of f16; for k-quants run llama.cpp's llama-quantize on the f16 file.",
    )
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="hf: largest safetensors shard (default: export_size GB, else 2GB).",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="hf: weights dtype (default: the base model's saved dtype).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")


def run(args: argparse.Namespace) -> int:
    """Merge, check, and write the requested format atomically."""
    from corral.export.export import export
    from corral.infer.preflight import check_inputs

    config = config_from_args(args, {key: getattr(args, key) for key in FLAGS.values()})
    for note in config.notes:
        get_logger().warning(note)
    settings = config.export
    output = args.output or settings.export_dir
    if output is None:
        raise ConfigError(["corral export needs --output (or export_dir in the config)"])
    model = config.model
    if settings.export_device is not None:
        model = replace(model, device="cpu" if settings.export_device == "cpu" else "auto")
    fmt = args.format or ("gguf" if output.lower().endswith(".gguf") else "hf")
    _check_shard_size(args.max_shard_size)
    check_inputs(model)
    export(
        model,
        Path(output),
        fmt=fmt,
        quant=args.quant,
        max_shard_size=args.max_shard_size or f"{settings.export_size or 2}GB",
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    return 0


def _check_shard_size(size: str | None) -> None:
    """--max-shard-size as transformers reads it ("2GB", "500MB", "1GiB"), checked up front."""
    if size is None:
        return
    from transformers.utils.hub import convert_file_size_to_int

    try:
        valid = convert_file_size_to_int(size) > 0
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError([f"--max-shard-size '{size}': expected a size like 2GB, 500MB or 1GiB"])
