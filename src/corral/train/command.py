"""`corral train CONFIG.yaml [key=value ...]`: train a model (a config file is optional).

corral train examples/sft_lora_alpaca.yaml
corral train dataset=identity max_steps=20 output_dir=saves/me
"""

from __future__ import annotations

import argparse

from corral.config.cli_args import add_config_args, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`corral train` takes the config file and overrides only."""
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    """Build the config and run the training workflow."""
    from corral.infer.preflight import check_inputs

    config = config_from_args(args)  # config errors first, before the slow imports
    check_inputs(config.model, config.data)  # then the model, template and datasets exist
    from corral.train.workflow import run_training

    run_training(config)
    return 0
