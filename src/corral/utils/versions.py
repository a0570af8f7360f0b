"""`corral version`: what corral runs on, for bug reports and saved run info."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from corral import __version__

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    """corral's and its main libraries' versions (without importing them)."""
    versions = {"corral": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_device() -> str:
    """The device corral would use with `device: auto`, described for people."""
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`corral version` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print one `name version` line per library, then the device."""
    for name, version in library_versions().items():
        print(f"{name:<13} {version}")
    print(f"{'device':<13} {default_device()}")
    return 0
