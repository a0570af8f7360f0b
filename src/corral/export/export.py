"""`export`: the one function behind `corral export` (merge, check, write atomically)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from corral.config.fields import ModelConfig
from corral.export.merge import MergedModel, load_merged
from corral.export.outputs import atomic_output
from corral.utils.errors import ExportError
from corral.utils.log import get_logger, quiet_libraries


def export(
    model_config: ModelConfig,
    output: Path,
    *,
    fmt: str = "hf",
    quant: str = "f16",
    max_shard_size: str = "2GB",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Merge `model_config`'s adapters into its base model and write it as `fmt`.

    Args:
        model_config: base model, adapters, template and device.
        output: a folder for 'hf', a .gguf file for 'gguf'.
        fmt: 'hf' or 'gguf'.
        quant: GGUF tensor type (see `gguf_file.QUANTS`).
        max_shard_size: hf: the largest safetensors shard.
        dtype: hf: weights dtype, 'auto' for the base model's.
        overwrite: replace an existing output.

    Returns:
        `output`, complete.

    Raises:
        ExportError: an existing output without `overwrite`, a failed merge check, or a model
            or option the format cannot handle; a partial output is never left behind.
        ModelError: the model or an adapter cannot be loaded or combined.
    """
    quiet_libraries()
    if fmt == "gguf" and output.suffix.lower() != ".gguf":
        raise ExportError(f"--output '{output}': a GGUF export is one file; name it *.gguf")
    if output.exists() and not overwrite:  # before the slow load; atomic_output checks again
        raise ExportError(
            f"output '{output}' already exists; pass --overwrite to replace it or choose "
            "another --output"
        )
    start = time.perf_counter()
    merged = load_merged(model_config)
    with atomic_output(output, overwrite=overwrite, folder=fmt == "hf") as tmp:
        if fmt == "hf":
            from corral.export.hf_folder import write_hf_folder

            write_hf_folder(merged, tmp, max_shard_size=max_shard_size, dtype=dtype)
        else:
            _write_gguf(merged, tmp, quant)
    size = sum(p.stat().st_size for p in [output, *output.rglob("*")] if p.is_file())
    get_logger().info(
        f"exported {output} ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s"
    )
    return output


def _write_gguf(merged: MergedModel, path: Path, quant: str) -> None:
    from corral.export.gguf_file import check_architecture, write_gguf
    from corral.export.tokenizer_files import save_tokenizer

    check_architecture(merged.model.config)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=path.parent) as folder:
        save_tokenizer(merged, Path(folder))
        write_gguf(merged, path, Path(folder), quant)
