"""LoRA+ (loraplus_lr_ratio): LoRA's B matrices learn faster than the rest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from corral.config import load_config
from corral.train.workflow import run_training
from corral.utils.errors import ConfigError


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.json"
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."} for w in "abcdefgh"]
    path.write_text(json.dumps(rows))
    return path


def _train(model_dir, data_file, out, *extra: str) -> dict[str, torch.Tensor]:
    run_training(
        load_config(
            None,
            [
                f"model_name_or_path={model_dir}",
                f"dataset={data_file}",
                f"output_dir={out}",
                "template=chatml",
                "cutoff_len=32",
                "lora_rank=4",
                "learning_rate=1e-3",
                "lr_scheduler_type=constant",
                "max_steps=1",
                "stop_check_samples=0",
                "seed=0",
                *extra,
            ],
        )
    )
    return load_file(out / "adapter_model.safetensors")


def test_one_step_moves_lora_b_ratio_times_further(tiny_llama_dir, qa_file, tmp_path):
    plain = _train(tiny_llama_dir, qa_file, tmp_path / "plain")
    plus = _train(tiny_llama_dir, qa_file, tmp_path / "plus", "loraplus_lr_ratio=16")
    names = [n for n in plain if "lora_B" in n]
    assert names
    # B starts at zero and Adam's first step is lr x sign(grad), so B moved lr x 16 vs lr
    for name in names:
        moved, moved_plus = plain[name].abs().max(), plus[name].abs().max()
        assert moved > 0
        assert moved_plus / moved == pytest.approx(16, rel=1e-3), name
    # A's gradient is zero while B is zero: A did not move in either run
    for name in (n for n in plain if "lora_A" in n):
        torch.testing.assert_close(plain[name], plus[name])


def test_param_groups_keep_the_chosen_optimizer(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from corral.train.trainer import CorralTrainer, TokenMeter

    model, _ = tiny_llama
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    trainer = CorralTrainer(
        model=model,
        args=TrainingArguments(output_dir="unused", learning_rate=2e-4, optim="adagrad"),
        meter=TokenMeter(),
        loraplus=(8.0, 1e-6),
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.Adagrad)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())
    for name, lr in lr_of.items():
        if "lora_embedding" in name:
            expected = 1e-6
        elif "lora_B" in name:
            expected = 2e-4 * 8
        else:
            expected = 2e-4
        assert lr == pytest.approx(expected), name
    assert any("lora_embedding" in n for n in lr_of)


def test_loraplus_needs_lora():
    with pytest.raises(ConfigError, match="loraplus_lr_ratio needs finetuning_type: lora"):
        load_config(None, ["finetuning_type=full", "loraplus_lr_ratio=16"])
    # TRL's GRPOTrainer builds its own optimizer: refused rather than silently plain LoRA
    with pytest.raises(ConfigError, match="loraplus_lr_ratio is not supported with stage grpo"):
        load_config(None, ["stage=grpo", "reward_funcs=m:f", "loraplus_lr_ratio=16"])
