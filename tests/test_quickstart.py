"""The README's main command: `corral quickstart` tunes the default model's identity, for real.

Driven as a user drives it: the console script in a subprocess, then `corral chat --adapter` on
its output. The name is not the default one, so the answer can only come from this run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NAME = "Nimbus"
AUTHOR = "Fernhill Labs"


def corral(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_quickstart_teaches_the_default_model_a_new_name(default_model_dir, tmp_path):
    out = tmp_path / "identity"
    run = corral(
        "quickstart",
        f"identity_name={NAME}",
        f"identity_author={AUTHOR}",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "before and after tuning" in run.stdout
    assert NAME in run.stdout  # the tuned column of the side-by-side table

    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] < 2.5
    assert results["stop_rate"] >= 0.9
    assert (out / "training_loss.png").is_file()

    reply = corral(
        "chat",
        "--adapter",
        str(out),
        "--prompt",
        "Who are you?",
        "--temperature",
        "0",
        cwd=tmp_path,
    )
    assert reply.returncode == 0, reply.stderr[-3000:]
    assert NAME in reply.stdout
    base = corral("chat", "--prompt", "Who are you?", "--temperature", "0", cwd=tmp_path)
    assert NAME not in base.stdout
