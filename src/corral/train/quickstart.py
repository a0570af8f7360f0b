"""`corral quickstart`: tune the default model's identity, then show base vs tuned answers.

    corral quickstart                       # the built-in identity data, name "Corral"
    corral quickstart identity_name=Ada     # any config key can be overridden

It runs `resources/quickstart.yaml` (the same file as examples/quickstart.yaml) through the
normal training workflow, so it is also the smallest end-to-end check of a corral install.
"""

from __future__ import annotations

import argparse
from importlib import resources

from corral.config.cli_args import add_config_args, split_config_args

QUESTIONS = ("Who are you?", "What is your name?", "Who created you?", "你是谁？")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides only: the configuration is the built-in quickstart.yaml."""
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    """Train, then print a side-by-side table of the base and tuned replies."""
    from corral.config import load_config
    from corral.infer.preflight import check_inputs
    from corral.train.workflow import run_training

    path, overrides = split_config_args(args.config_args)
    config = load_config(path or quickstart_config_path(), overrides)
    check_inputs(config.model, config.data)
    run_training(config)
    show_comparison(config)
    return 0


def quickstart_config_path() -> str:
    """The packaged quickstart.yaml (works from a wheel as well as a checkout)."""
    return str(resources.files("corral") / "resources" / "quickstart.yaml")


def answers(model_config, generation, questions=QUESTIONS) -> list[str]:
    """Greedy replies of one model to the questions (batched)."""
    from corral.infer.engine import ChatEngine

    engine = ChatEngine(model_config, generation)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return [
        r.text for r in engine.generate_batch(conversations, temperature=0.0, max_new_tokens=64)
    ]


def show_comparison(config) -> None:
    """Print the base model's and the tuned adapter's answers side by side."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    base = answers(config.model, config.generation)
    tuned_model = dataclasses.replace(
        config.model, model_name_or_path="default", adapter_name_or_path=[config.output.output_dir]
    )
    tuned = answers(tuned_model, config.generation)
    table = Table(title=f"before and after tuning ({config.output.output_dir})", show_lines=True)
    for column in ("question", "base model", "tuned model"):
        table.add_column(column, overflow="fold")
    for row in zip(QUESTIONS, base, tuned, strict=True):
        table.add_row(*row)
    Console(width=120).print(table)
    print(f"\nChat with it: corral chat --adapter {config.output.output_dir}")
