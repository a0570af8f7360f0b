"""Trainer callbacks shared by every stage: progress display, JSON-lines log, Ctrl-C save."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from corral.train.trainer import TokenMeter
from corral.utils.log import get_logger

LOG_FILE = "trainer_log.jsonl"


class ProgressCallback(TrainerCallback):
    """A rich progress bar (step, loss, lr, tokens/s, ETA) on terminals; log lines elsewhere."""

    def __init__(self, meter: TokenMeter):
        self.meter = meter
        self.progress = None
        self.task = None
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.meter.started = time.perf_counter()
        if sys.stderr.isatty() and state.is_world_process_zero:
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=state.max_steps, stats="", completed=state.global_step
            )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats())

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        logs = logs or {}
        if "loss" in logs:
            logs["real_tokens_per_second"] = round(self.meter.tokens_per_second(), 1)
        self.last.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        if self.progress is None and ("loss" in logs or "eval_loss" in logs):
            get_logger().info(f"step {state.global_step}/{state.max_steps} {self._stats()}")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        self.meter.stopped = time.perf_counter()
        if self.progress is not None:
            self.progress.stop()

    def _stats(self) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "eval_loss" in self.last:
            parts.append(f"eval_loss {self.last['eval_loss']:.4f}")
        for key in ("reward", "kl"):  # RL stages: their rollouts' score and KL
            if key in self.last:
                parts.append(f"{key} {self.last[key]:.4f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        parts.append(f"{self.meter.tokens_per_second():.0f} tok/s")
        return "  ".join(parts)


class JsonlLogCallback(TrainerCallback):
    """Appends every logging step to output_dir/trainer_log.jsonl (one JSON object a line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(Path(args.output_dir) / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def truncate_log(output_dir: str | Path, step: int) -> None:
    """Keep only the log lines of steps up to `step`: a run resumed from the checkpoint of that
    step logs the later ones again. A line cut short by a kill is dropped."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    if kept:
        temp = path.with_name(f".{LOG_FILE}.tmp")
        temp.write_text("".join(kept), encoding="utf-8")
        temp.replace(path)
    else:
        path.unlink()


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second: abort."""

    def __init__(self):
        self.interrupted = False
        self._previous: Any = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        get_logger().warning(
            "interrupted: saving a checkpoint after this step (Ctrl-C again to abort)"
        )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
