"""Trainable parameters of each finetuning_type on a model (default: the default model).

    python benchmarks/methods.py [model_name_or_path]

Each method is applied with corral's defaults (freeze: the last 2 blocks; lora: rank 8 on every
linear layer; prefix/prompt: 16 virtual tokens) and its trainable parameters are counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = (
    ("full",),
    ("freeze",),
    ("lora",),
    ("prefix",),
    ("prefix", "prefix_projection=true"),
    ("prompt",),
)


def main() -> None:
    from corral.config import load_config
    from corral.model.adapters import apply_method
    from corral.model.load import load_model

    model_name = sys.argv[1] if len(sys.argv) > 1 else "default"
    print("| finetuning_type | trainable parameters |\n|---|---|")
    for kind, *extra in METHODS:
        keys = [f"model_name_or_path={model_name}", f"finetuning_type={kind}", *extra]
        config = load_config(None, keys)
        model, _ = load_model(config.model, for_training=True)
        model = apply_method(model, config.method)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"| {' '.join([kind, *extra])} | {trainable:,} |")


if __name__ == "__main__":
    main()
