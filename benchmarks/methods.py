"""Trainable parameters, training speed and peak memory of each finetuning_type.

    python benchmarks/methods.py                       # the default model, 16 steps, 3 rounds
    python benchmarks/methods.py --no-train                # trainable parameters only
    python benchmarks/methods.py --model DIR --only lora,prompt --steps 2 --repeats 1

Each method is applied with corral's defaults (freeze: the last 2 blocks; lora: rank 8 on every
linear layer; prefix/prompt: 16 virtual tokens) and its trainable parameters are counted. Then
each trains `stage: sft` on the first 64 examples of `alpaca_en_demo` (cutoff 512, batch 4,
--steps steps) in a fresh `corral train` process, the methods interleaved for --repeats rounds:
the table gives the median real (non-padding) tokens/s, from the first step to the last, and the
median peak RSS of the training process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METHODS = (
    ("full",),
    ("freeze",),
    ("lora",),
    ("prefix",),
    ("prefix", "prefix_projection=true"),
    ("prompt",),
)


def trainable_parameters(model_name: str, kind: str, extra: list[str]) -> int:
    from corral.config import load_config
    from corral.model.adapters import apply_method
    from corral.model.load import load_model

    config = load_config(
        None, [f"model_name_or_path={model_name}", f"finetuning_type={kind}", *extra]
    )
    model, _ = load_model(config.model, for_training=True)
    model = apply_method(model, config.method)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_once(
    model_name: str, kind: str, extra: list[str], steps: int, output: Path
) -> tuple[float, float]:
    """(real tokens/s, peak RSS in MB) of a short sft run in a fresh process."""
    keys = [
        "stage=sft",
        f"model_name_or_path={model_name}",
        f"finetuning_type={kind}",
        *extra,
        "dataset=alpaca_en_demo",
        f"dataset_dir={ROOT / 'data'}",
        "max_samples=64",
        "cutoff_len=512",
        "per_device_train_batch_size=4",
        f"max_steps={steps}",
        "logging_steps=4",
        "save_strategy=no",
        "plot_loss=false",
        "stop_check_samples=0",  # the after-training replies are not training
        "seed=42",
        f"output_dir={output}",
        "overwrite_output_dir=true",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "corral", "train", *keys], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"corral train finetuning_type={kind} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((output / "train_results.json").read_text())
    return metrics["real_tokens_per_second"], metrics["peak_memory_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="count parameters only")
    parser.add_argument("--only", help="comma-separated finetuning_types (default: all)")
    args = parser.parse_args()
    kinds = args.only.split(",") if args.only else [m[0] for m in METHODS]
    methods = [m for m in METHODS if m[0] in kinds]
    if not methods or set(kinds) - {m[0] for m in METHODS}:
        parser.error(f"--only: choose from {', '.join(dict.fromkeys(m[0] for m in METHODS))}")
    from corral.utils.log import quiet_libraries

    quiet_libraries()
    params = {m: trainable_parameters(args.model, m[0], list(m[1:])) for m in (("full",), *methods)}
    runs: dict[tuple, list[tuple[float, float]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(0 if args.no_train else args.repeats):
            for method in methods:
                runs[method].append(
                    train_once(
                        args.model, method[0], list(method[1:]), args.steps, Path(tmp) / "run"
                    )
                )
    total = params[("full",)]
    print("| finetuning_type | trainable parameters | real tokens/s | peak RSS (MB) |")
    print("|---|---|---|---|")
    for method in methods:
        speed = statistics.median(r[0] for r in runs[method]) if runs[method] else None
        memory = statistics.median(r[1] for r in runs[method]) if runs[method] else None
        cells = [f"{speed:.1f}", f"{memory:.0f}"] if speed else ["-", "-"]
        share = f"{100 * params[method] / total:.3g}%"
        print(f"| {' '.join(method)} | {params[method]:,} ({share}) | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
