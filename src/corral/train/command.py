"""`corral train CONFIG.yaml [key=value ...]`: train a model (a config file is optional).

corral train examples/sft_lora_alpaca.yaml
corral train dataset=identity max_steps=20 output_dir=saves/me
corral train examples/sft_lora_alpaca.yaml --nproc-per-node 2   # under torchrun, 2 processes
"""

from __future__ import annotations

import argparse

from corral.config.cli_args import add_config_args, config_from_args
from corral.train.launch import add_launch_arguments, relaunch, wants_launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`corral train` takes the config file and overrides, and torchrun's process options."""
    add_config_args(parser)
    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build the config and run the training workflow (in N processes with --nproc-per-node)."""
    from corral.infer.preflight import check_inputs

    launch = wants_launch(args)  # the command line's own mistakes first
    config = config_from_args(args)  # then the config's, once, before the slow imports
    check_inputs(config.model, config.data)  # then the model, template and datasets exist
    if launch:
        relaunch(args, [*(["--debug"] if args.debug else []), "train", *args.config_args])
    from corral.train.workflow import run_training

    run_training(config)
    return 0
