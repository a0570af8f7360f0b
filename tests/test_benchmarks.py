"""The training benchmark harness runs end to end (2 steps, tiny model), so it cannot rot."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_benchmark_smoke(default_model_dir):  # reads data/alpaca_en_demo.json
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    print(out)
    assert re.search(r"matmul peak \(cpu, fp32\): [\d.]+ GFLOP/s", out)
    assert re.search(r"preprocessing of the whole alpaca_en_demo file: [\d.]+ s cold", out)
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("corral-", "reference-"))
    }
    assert set(rows) == {"corral-lora", "reference-lora", "corral-full", "reference-full"}
    for cells in rows.values():
        assert float(cells[1]) > 0 and cells[-1].endswith("%")  # real tok/s, MFU
    # same batches, same initial adapter, same optimizer: corral computes the same loss
    for method in ("lora", "full"):
        ours, reference = (
            float(rows[f"corral-{method}"][-2]),
            float(rows[f"reference-{method}"][-2]),
        )
        assert abs(ours - reference) < 2e-3, (method, ours, reference)
    assert "corral-lora / reference-lora:" in out and "corral-full / reference-full:" in out


def test_train_benchmark_dpo_smoke(default_model_dir):  # reads data/dpo_en_demo.json
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--smoke", "--stage", "dpo"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    print(out)
    assert '"stage": "dpo"' in out and '"dataset": "dpo_en_demo"' in out
    assert re.search(r"preprocessing of the whole dpo_en_demo file: [\d.]+ s cold", out)
    [row] = [line.split() for line in out.splitlines() if line.startswith("corral-lora ")]
    real, trained, pairs_per_s = float(row[1]), float(row[2]), float(row[3])
    assert real > trained > 0 and pairs_per_s > 0  # both replies of a pair are counted
    assert abs(float(row[-2]) - math.log(2)) < 0.01  # a fresh adapter: policy = reference
