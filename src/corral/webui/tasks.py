"""Evaluate and export from the page: the same `corral eval` / `corral export` commands, run
as subprocesses, so the page shows exactly the command line and the error the CLI gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from corral.eval.command import LIST_KEYS, SUBCOMMANDS
from corral.export.command import QUANTS  # noqa: F401 - the Export tab's choices
from corral.webui.form import to_text


def eval_command(kind: str, values: dict[str, Any]) -> list[str]:
    """`corral eval KIND --flag value ...` for the non-empty values (keys are config keys;
    the subcommand's flags decide which apply)."""
    flags = {key: flag for flag, key in SUBCOMMANDS[kind][1].items()}
    command = ["corral", "eval", kind]
    for key, value in values.items():
        text = to_text(value).strip()
        if key not in flags or not text:
            continue
        many = key in LIST_KEYS  # flags with nargs="+"
        command += [flags[key], *(text.replace(",", " ").split() if many else [text])]
    return command


def export_command(
    model: str, adapter: str, output: str, fmt: str, quant: str, overwrite: bool
) -> list[str]:
    """`corral export ...` as the user would type it."""
    command = ["corral", "export"]
    if model.strip():
        command += ["--model", model.strip()]
    if adapter.strip():
        command += ["--adapter", *adapter.replace(",", " ").split()]
    command += ["--output", output.strip(), "--format", fmt]
    if fmt == "gguf":
        command += ["--quant", quant]
    return command + (["--overwrite"] if overwrite else [])


def run_cli(command: list[str]) -> tuple[bool, str]:
    """Run a `corral ...` command line; (ok, its stdout) or (False, the error line it printed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "corral", *command[1:]],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode == 0:
        return True, done.stdout
    lines = (done.stderr or done.stdout).strip().splitlines()
    prefix = f"corral {command[1]}: error:"
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if start is None:
        return False, "\n".join(lines[-5:])  # not a user error: the end of the traceback
    return False, "\n".join(lines[start:])


def first_predictions(save_dir: str, count: int = 3) -> list[dict]:
    """The first rows of an evaluation's predictions.jsonl (generate), else none."""
    path = Path(save_dir) / "predictions.jsonl"
    if not save_dir or not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == count:
                break
    return rows


def size_of(path: str) -> int:
    """Bytes in a file, or in every file under a folder."""
    target = Path(path)
    if target.is_file():
        return target.stat().st_size
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def human_size(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"
