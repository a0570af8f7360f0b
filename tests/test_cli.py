"""The command line as a user meets it: help, versions, and bad input without tracebacks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from corral.cli import COMMANDS


def corral(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=timeout
    )


def test_top_level_help_lists_every_command():
    result = corral("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command):
    result = corral(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: corral {command}")


def test_version_lists_libraries_and_device():
    result = corral("version")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [
        "corral",
        "python",
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "device",
    ]
    # the device it would use: cpu here, cuda or mps where there is one
    assert re.search(r"\b(cpu|cuda(:\d+)?|mps)\b", result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chta"], "invalid choice: 'chta'"),
        (
            ["chat", "--tempreature", "0"],
            "unrecognized arguments: --tempreature (did you mean '--temperature'?)",
        ),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_a_suggestion(args, message):
    result = corral(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if args == ["chta"]:
        assert "(did you mean 'chat'?)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "lora_rnak=3"], "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
        (["train", "cutoff_len=-1"], "cutoff_len: must be >= 1, got -1"),
        (["train", "oops"], "'oops' is neither a .yaml config file nor a key=value override"),
        (["chat", "--model", "./no/such/model", "--prompt", "hi"], "does not exist"),
        (["chat", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        # an output folder under a file: the OS's own error, as one line naming the path
        (["train", "output_dir=README.md/out"], "Not a directory: 'README.md/out'"),
    ],
)
def test_user_errors_exit_1_with_one_message(args, message):
    result = corral(*args)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
