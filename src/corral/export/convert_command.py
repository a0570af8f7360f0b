"""`corral convert meta`: Meta's original checkpoints into a Hugging Face folder.

    corral convert meta --input llama-2-7b --output models/llama-2-7b-hf

The input folder holds `params.json`, `consolidated.00.pth` (one per model-parallel rank) and
`tokenizer.model`. The output trains with `corral train` and exports with `corral export`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SOURCES = {
    "meta": "Meta's original LLaMA / Llama 2 / Llama 3 checkpoints (params.json, consolidated.NN.pth)"
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`convert SOURCE --input DIR --output DIR [--overwrite]`."""
    parser.add_argument(
        "source", choices=SOURCES, help="; ".join(f"{k}: {v}" for k, v in SOURCES.items())
    )
    parser.add_argument("--input", required=True, help="The folder holding the checkpoint.")
    parser.add_argument("--output", required=True, help="The Hugging Face folder to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")


def run(args: argparse.Namespace) -> int:
    """Convert atomically: the output folder appears only when complete."""
    from corral.export.meta import convert_meta, read_params
    from corral.export.outputs import atomic_output
    from corral.utils.log import quiet_libraries

    quiet_libraries()
    source = Path(args.input).expanduser()
    read_params(source)  # a wrong folder fails before anything is created
    with atomic_output(Path(args.output), overwrite=args.overwrite, folder=True) as tmp:
        convert_meta(source, tmp)
    return 0
