"""Fail fast and in one line: every option of every command, given an out-of-range or
wrong-type value, ends in corral's own error naming what was typed, before any model loads.

The walk runs `cli.main` in-process (a wrong value that slipped through would load the default
model or start a server, which the alarm turns into a failure); two cases from the issue run as
the real console command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corral import cli

SRC = Path(__file__).resolve().parents[1] / "src"
DATA = SRC.parent / "data"
DEMO = ["--dataset-dir", str(DATA), "--dataset", "alpaca_en_demo"]
MC_SAMPLE = SRC / "corral" / "resources" / "mc_sample"
# options whose every value is valid (text or an output path), so no value can be wrong
FREE_TEXT = {"--system", "--prompt", "--api-key", "--served-model-name", "--output", "--json"}
FREE_TEXT |= {"--runs-dir"}  # the web UI's output folder: any path is one
NAMES = {"--template", "--dataset", "--split", "--lang", "--device", "--subjects", "--backend"}
NAMES |= {"--format", "--quant", "--dtype"}
PATHS = {"--model", "--adapter", "--dataset-dir", "--task-dir", "--tools", "--input"}
WRONG = ["-7", "abc", "1e999"]  # out of range, wrong type, overflow


def _context(command: str, tmp: Path) -> list[str]:
    """What a command needs besides the option under test, so only that option is wrong."""
    return {
        "chat": ["--prompt", "hi"],
        "export": ["--output", str(tmp / "out")],
        "convert": ["meta", "--input", str(tmp), "--output", str(tmp / "out")],
        "eval generate": ["--output", str(tmp / "ev"), *DEMO],
        "eval ppl": ["--output", str(tmp / "ev"), *DEMO],
        "eval pref": [
            "--output",
            str(tmp / "ev"),
            "--dataset-dir",
            str(DATA),
            "--dataset",
            "dpo_en_demo",
        ],
        "eval mc": ["--output", str(tmp / "ev"), "--task-dir", str(MC_SAMPLE)],
    }.get(command, [])


def _options() -> list[tuple[str, str]]:
    """(command, option) for every value-taking option of every command and eval subcommand."""
    _, subparsers = cli.build_parser()
    found = []
    for name, parser in subparsers.items():
        parsers = {name: parser}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers = {f"{name} {sub}": p for sub, p in action.choices.items()}
        for command, sub in parsers.items():
            for action in sub._actions:
                takes_value = action.option_strings and action.nargs != 0
                if takes_value and action.option_strings[0] not in FREE_TEXT:
                    found.append((command, action.option_strings[0]))
    return found


def _values(option: str) -> list[str]:
    if option in NAMES:
        return ["nosuch"]
    if option in PATHS:
        return ["/nonexistent/nosuch"]
    if option == "--host":
        return ["999.1.1.1"]
    return WRONG


class _Hung(Exception):
    pass


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """`corral ARGV` in-process: (exit code, stderr); an uncaught exception fails the test."""

    def hung(signum, frame):
        raise _Hung(f"corral {' '.join(argv)} did not fail within 60 s: validated too late")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: a wrong type or choice
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


OPTIONS = _options()


def test_the_walk_covers_every_command():
    commands = {command.split()[0] for command, _ in OPTIONS}
    assert commands >= {"chat", "export", "convert", "eval", "serve"}
    assert ("serve", "--port") in OPTIONS and ("eval mc", "--n-shot") in OPTIONS


@pytest.mark.slow
@pytest.mark.parametrize(("command", "option"), OPTIONS, ids=[" ".join(o) for o in OPTIONS])
def test_every_option_fails_fast_in_one_line(command, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command writes lands in the checkout
    for value in _values(option):
        argv = [*command.split(), *_context(command, tmp_path), option, value]
        code, err = _run(argv, capsys)
        assert code in (1, 2), (argv, code, err)
        said = [line for line in err.splitlines() if " error: " in line]
        assert said and said[0].startswith(f"corral {command.split()[0]}"), (argv, err)
        assert "Traceback" not in err
        # the message names what was typed: the flag, its config key or the value
        key = option.lstrip("-").replace("-", "_")
        assert any(word in err for word in (option, key, value, value.strip("/"))), (argv, err)


@pytest.mark.parametrize(
    "override",
    ["dataset=nosuch", "max_steps=-7", "learning_rate=abc", "cutoff_len=1e999", "nosuchkey=1"],
)
def test_train_overrides_fail_before_the_model_loads(override, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(["train", f"output_dir={tmp_path / 'out'}", override], capsys)
    assert code == 1 and err.startswith("corral train: error:"), err
    assert override.split("=")[0] in err or override.split("=")[1] in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "99999"], "--port must be in 0..65535; got 99999"),
        (["train", "dataset=nosuch"], "dataset 'nosuch' not found"),
    ],
)
def test_the_console_command_says_it_in_one_line(argv, message, tmp_path):
    environ = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-m", "corral", *argv],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "loading" not in done.stderr


def test_a_busy_port_is_refused_before_loading(capsys):
    import socket

    with contextlib.closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _run(["serve", "--port", str(port)], capsys)
    assert code == 1 and f"cannot listen on --host 127.0.0.1 --port {port}" in err, err
    assert "loading" not in err
