"""Command-line glue shared by config-driven commands: `CONFIG.yaml key=value ...`."""

from __future__ import annotations

import argparse
from typing import Any

from corral.config.parse import CorralConfig, load_config
from corral.utils.errors import ConfigError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add the optional YAML file and `key=value` overrides every config-driven command takes."""
    parser.add_argument(
        "config_args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="A YAML config file (LLaMA-Factory keys work) and/or key=value overrides.",
    )


def config_from_args(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> CorralConfig:
    """Build the config from the positional YAML/overrides plus explicit flags (flags win)."""
    path, overrides = split_config_args(args.config_args)
    return load_config(path, overrides, flags)


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Separate an optional leading YAML path from `key=value` overrides."""
    path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif path is None and item.endswith((".yaml", ".yml")):
            path = item
        else:
            raise ConfigError([f"'{item}' is neither a .yaml config file nor a key=value override"])
    return path, overrides
