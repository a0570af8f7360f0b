"""The training benchmark harness runs end to end (2 steps, tiny model), so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


SCALE = ROOT / "benchmarks" / "scale.py"
SCALE_RUNS = (
    "single-lora",
    "single-full",
    "ddp-full",
    "zero3-offload-full",
    "fsdp-full",
    "qlora4-lora",
    "qlora8-lora",
)


@pytest.mark.slow
def test_scale_benchmark_cpu_plumbing(default_model_dir, tmp_path):
    """The GPU scale-out matrix runs end to end on 2 gloo processes and a tiny random Llama:
    every run is a real `corral train`, and the table lists each with numbers."""
    done = subprocess.run(
        [sys.executable, str(SCALE), "--device", "cpu", "--tiny", "--steps", "2", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    print(done.stdout)
    results = json.loads((tmp_path / "out" / "scale.json").read_text())["results"]["tiny"]
    assert list(results) == list(SCALE_RUNS)
    assert "needs GPUs" in results["fsdp-full"]["skipped"]
    for name in set(SCALE_RUNS) - {"fsdp-full"}:
        run = results[name]
        assert run["real_tok_s"] > 0 and run["rss_peak_mb"] > 0 and len(run["losses"]) == 2
        assert run["processes"] == (2 if name in ("ddp-full", "zero3-offload-full") else 1)
        assert run["gpu_peak_mb"] is None  # no GPU: nothing invented
        assert run["tok_s_ratio"] > 0 and run["memory_ratio"] > 0
    # the same global batch over 2 processes (DDP, ZeRO-3 + offload) gives the one-process losses
    for name in ("ddp-full", "zero3-offload-full"):
        assert results[name]["max_step_loss_diff"] < 1e-3, results[name]
    assert results["single-full"]["final_loss_diff"] == 0
    table = (tmp_path / "out" / "scale.md").read_text()
    for name in set(SCALE_RUNS) - {"fsdp-full"}:
        [row] = [line for line in table.splitlines() if f"| {name} |" in line]
        assert re.search(r"\| \d+ \| [\d.]+ \| [\d.]+x \| \d+ \| [\d.]+x \| [\d.]+ \|", row), row
    assert table in done.stdout


def test_scale_benchmark_without_a_gpu_says_how_to_check_on_cpu():
    done = subprocess.run(
        [sys.executable, str(SCALE)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "found no CUDA device" in done.stderr
    assert "--device cpu --tiny" in done.stderr


INFER_ROWS = (
    "generate",
    "engine",
    "llamacpp",
    "serve-hf c1",
    "serve-hf c2",
    "serve-llamacpp c1",
    "eval b2",
    "eval b1",
)


@pytest.mark.slow
def test_infer_benchmark_runs_every_system(tiny_llama_dir, tmp_path):
    """One round on the tiny model: raw generate, the chat engine, `corral serve` (hf and
    llamacpp, on a GGUF `corral export` writes), llama.cpp direct and eval batching all run and
    report positive numbers (no timing is asserted)."""
    out = _run_benchmark(
        "infer.py",
        *("--model", str(tiny_llama_dir), "--max-tokens", "6", "--rounds", "1"),
        *("--clients", "1,2", "--llamacpp-clients", "1", "--eval-prompts", "2"),
        *("--eval-batch", "2", "--json", "out.json"),
        cwd=tmp_path,
    )
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| system")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == list(INFER_ROWS)
    for name, cells in rows.items():
        numbers = [float(c) for c in cells if c != "-"]
        assert numbers and all(n > 0 for n in numbers), (name, cells)
        assert ("-" in cells[:2]) == name.startswith("eval")  # eval rows have no TTFT/decode
    medians = json.loads((tmp_path / "out.json").read_text())["medians"]
    assert medians["eval b2"]["examples_s"] > 0 and medians["engine"]["tokens"] == 6
    assert "engine / generate ttft:" in out
    assert "serve-hf c2 / serve-hf c1 aggregate:" in out


def _run_benchmark(script: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    return done.stdout


def _table(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_methods_benchmark_trains_each_method_chosen(tiny_llama_dir):
    out = _run_benchmark(
        "methods.py",
        "--model",
        str(tiny_llama_dir),
        "--only",
        "lora,prompt",
        "--steps",
        "2",
        "--repeats",
        "1",
    )
    table = _table(out)
    assert set(table) == {"lora", "prompt"}
    for params, speed, memory in table.values():
        assert int(params.split()[0].replace(",", "")) > 0
        assert float(speed) > 0 and float(memory) > 0


@pytest.mark.slow
def test_vocab_benchmark_reports_before_and_after(tiny_llama_dir):
    out = _run_benchmark(
        "vocab.py",
        "--model",
        str(tiny_llama_dir),
        "--add",
        "50",
        "--corpus-records",
        "100",
        "--pt-records",
        "16",
        "--cutoff",
        "128",
        "--repeats",
        "1",
    )
    table = _table(out)
    assert set(table) == {"before", "after"}
    before, after = ([float(c) for c in table[k]] for k in ("before", "after"))
    assert after[0] < before[0]  # fewer tokens per character
    assert all(math.isfinite(v) and v > 0 for v in before + after)
    assert "50 tokens added" in out and "fewer tokens" in out
