"""Every shipped example config is valid, and quickstart.yaml is what `corral quickstart` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import load_config
from corral.train.quickstart import quickstart_config_path

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {
        "quickstart.yaml",
        "sft_lora_alpaca.yaml",
        "sft_full.yaml",
        "sft_freeze.yaml",
        "pt_wiki.yaml",
        "dpo_lora.yaml",
        "kto_lora.yaml",
        "rm_lora.yaml",
        "ppo_lora.yaml",
        "grpo_lora.yaml",
        "sft_lora_glaive_toolcall.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_and_fully_supported(path):
    config = load_config(path)
    assert config.notes == []  # every key is one corral uses


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_datasets_resolve(path, monkeypatch):
    from corral.data.registry import resolve_datasets

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples name data/ from the root
    config = load_config(path)
    specs = resolve_datasets(config.data.dataset, config.data.dataset_dir)
    assert all(spec.path is not None and Path(spec.path).exists() for spec in specs)


def test_quickstart_example_is_the_packaged_config():
    packaged = Path(quickstart_config_path()).read_text()
    assert (
        Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    ).read_text() == packaged


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if p.name != "quickstart.yaml"], ids=lambda p: p.name
)
def test_example_trains_from_the_command_line(path, default_model_dir, tmp_path):
    """Each example runs as a user runs it (from the repository root), cut to a few steps."""
    import json
    import math
    import os
    import subprocess
    import sys

    def train(example: Path, out: Path, *extra: str) -> None:
        overrides = ["max_steps=2", "max_samples=40", "stop_check_samples=0", f"output_dir={out}"]
        run = subprocess.run(
            [sys.executable, "-m", "corral", "train", str(example), *overrides, *extra],
            cwd=path.parents[1],
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]

    out, extra = tmp_path / "out", []
    if load_config(path).method.reward_model:  # ppo: first the reward model it names
        rm_cut = ["cutoff_len=128", "gradient_accumulation_steps=1", "val_size=0"]
        train(path.parent / "rm_lora.yaml", tmp_path / "rm", *rm_cut)
        rollouts_cut = ["gradient_accumulation_steps=2", "ppo_epochs=2", "max_new_tokens=8"]
        extra = [f"reward_model={tmp_path / 'rm'}", *rollouts_cut]
    train(path, out, *extra)
    results = json.loads((out / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and results["real_tokens"] > 0
    assert (out / "corral_config.yaml").is_file() and (out / "corral_run.json").is_file()
