"""Training runs the page starts: ordinary `corral train RUN.yaml` subprocesses.

Each run leaves three files in the records folder (`<root>/.webui/`): NAME.yaml (the config the
run was started with, which `corral train` accepts as is), NAME.log (its stdout and stderr) and
NAME.pid (while it may be running). A run gets its own session, so it outlives the page and the
server; reopening the page lists every record again, with the state read from the files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from corral.train.callbacks import LOG_FILE

RESULTS_FILE = "train_results.json"
STEP_LINE = re.compile(r"step (\d+)/(\d+)")
ERROR_PREFIX = "corral train: error:"
# Values from the JSON-lines log drawn on the curve (preference and RL stages log rewards).
CURVES = ("loss", "eval_loss", "reward", "rewards/chosen", "rewards/margins")


@dataclass
class RunState:
    """What the page shows about one run."""

    name: str
    status: str  # "running", "finished", "stopped", "failed"
    step: int
    max_steps: int
    eta_seconds: float | None
    error: str | None
    output_dir: str


class RunStore:
    """The records folder of runs started from the page."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records = self.root / ".webui"
        self._children: dict[str, subprocess.Popen] = {}

    def command(self, name: str) -> list[str]:
        """The command line a run is (as the user would type it)."""
        return ["corral", "train", str(self.records / f"{name}.yaml")]

    def start(self, name: str, overrides: dict[str, Any]) -> list[str]:
        """Write NAME.yaml and start `corral train` on it; returns the command shown."""
        self.records.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(overrides, sort_keys=False, allow_unicode=True)
        (self.records / f"{name}.yaml").write_text(text, encoding="utf-8")
        return self._launch(name, mode="w")

    def resume(self, name: str) -> list[str]:
        """Start the run again from its latest checkpoint (resume_from_checkpoint: true)."""
        path = self.records / f"{name}.yaml"
        overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        overrides["resume_from_checkpoint"] = "true"
        path.write_text(yaml.safe_dump(overrides, sort_keys=False, allow_unicode=True), "utf-8")
        return self._launch(name, mode="a")

    def _launch(self, name: str, mode: str) -> list[str]:
        command = self.command(name)
        log = open(self.records / f"{name}.log", mode, encoding="utf-8")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(
            [sys.executable, "-m", "corral", *command[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # the run outlives the page and the server
        )
        log.close()
        self._children[name] = child
        (self.records / f"{name}.pid").write_text(f"{child.pid} {time.time()}\n")
        return command

    def stop(self, name: str) -> bool:
        """Ask a running run to stop: SIGINT, which `corral train` answers by saving a
        checkpoint after the current step (like Ctrl-C in a terminal)."""
        pid = self._pid(name)
        if pid is None:
            return False
        os.kill(pid, signal.SIGINT)
        return True

    def names(self) -> list[str]:
        """Every recorded run, newest first."""
        if not self.records.is_dir():
            return []
        paths = sorted(self.records.glob("*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in paths]

    def output_dir(self, name: str) -> str:
        """Where the run writes (the config's output_dir)."""
        from corral.config.parse import read_yaml

        return str(read_yaml(self.records / f"{name}.yaml").get("output_dir") or "")

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of the run's output."""
        path = self.records / f"{name}.log"
        if not path.is_file():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        return "\n".join(text.splitlines()[-lines:])

    def state(self, name: str) -> RunState:
        """Status, progress and ETA of a run, read from its files."""
        out = Path(self.output_dir(name))
        log = self.log_tail(name, lines=400)
        steps = STEP_LINE.findall(log)
        step, max_steps = (int(steps[-1][0]), int(steps[-1][1])) if steps else (0, 0)
        error = next((line for line in reversed(log.splitlines()) if ERROR_PREFIX in line), None)
        pid = self._pid(name)
        if pid is not None:
            status = "running"
        elif (out / RESULTS_FILE).is_file() and error is None:
            status = "finished"
        elif "interrupted" in log or "stopped at step" in log:
            status = "stopped"
        else:
            status = "failed"
            error = error or (log.splitlines()[-1] if log else "the run left no output")
        eta = None
        if status == "running" and step and max_steps:
            elapsed = time.time() - self._started(name)
            eta = elapsed / step * (max_steps - step)
        if status == "finished":
            step = max_steps = max(step, max_steps)
        return RunState(name, status, step, max_steps, eta, error, str(out))

    def curves(self, name: str) -> list[dict[str, Any]]:
        """Rows (step, value, series) of the run's logged loss and reward, for the plot."""
        path = Path(self.output_dir(name)) / LOG_FILE
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written
                continue
            for series in CURVES:
                if isinstance(record.get(series), int | float):
                    rows.append({"step": record["step"], "value": record[series], "series": series})
        return rows

    def outputs(self) -> list[str]:
        """Output folders of earlier runs under the root (models or adapters), newest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()
        ]
        return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def models(self) -> list[str]:
        """Models to start from: the default one, earlier outputs, GGUF files under the root."""
        gguf = sorted(str(p) for p in self.root.glob("*.gguf")) if self.root.is_dir() else []
        return ["default", *self.outputs(), *gguf]

    def _pid(self, name: str) -> int | None:
        """The run's process id while it is alive, else None (and the pid file is removed)."""
        path = self.records / f"{name}.pid"
        if not path.is_file():
            return None
        pid = int(path.read_text().split()[0])
        child = self._children.get(name)
        alive = child.poll() is None if child is not None else _alive(pid)
        if not alive:
            path.unlink(missing_ok=True)
            return None
        return pid

    def _started(self, name: str) -> float:
        path = self.records / f"{name}.pid"
        try:
            return float(path.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return time.time()


def _alive(pid: int) -> bool:
    """Whether a process started by an earlier server is still running (not a zombie)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))


def run_name(output_dir: str) -> str:
    """A record name for an output folder: its path with separators replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", output_dir.strip("/")) or "run"


def shown(command: list[str]) -> str:
    """A command line as the user would paste it into a shell."""
    return shlex.join(command)
