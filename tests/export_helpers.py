"""Helpers shared by the export and convert tests: a tiny LoRA run, greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
]


def train_adapter(model_dir: Path, out: Path, *extra: str, template: str = "chatml") -> Path:
    """A few LoRA steps on four Q&A pairs (large learning rate, so the adapter is far from 0)."""
    from corral.config import load_config
    from corral.train.workflow import run_training

    data = out.parent / f"{out.name}-qa.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    config = load_config(
        None,
        [
            f"model_name_or_path={model_dir}",
            f"dataset={data}",
            f"output_dir={out}",
            f"template={template}",
            "cutoff_len=64",
            "per_device_train_batch_size=4",
            "learning_rate=1e-2",
            "lr_scheduler_type=constant",
            "max_steps=3",
            "logging_steps=1",
            "save_steps=1000",
            "stop_check_samples=0",
            "seed=0",
            "lora_rank=4",
            *extra,
        ],
    )
    run_training(config)
    return out


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens from transformers, ignoring EOS (every position is compared)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()
