"""Prefix tuning (P-Tuning v2) and prompt tuning: virtual tokens train through peft's forward
(not corral's decoder-only fast path), resume, chat through the one engine, and refuse to merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.infer.engine import ChatEngine
from corral.model.load import load_model
from corral.model.prompt_learning import decoder_runs_alone
from corral.train import callbacks
from corral.train.workflow import run_training
from corral.utils.errors import ConfigError, ModelError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
]


@pytest.fixture
def sft_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    return path


def _config(model_dir, data_file, out, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={model_dir}",
            f"dataset={data_file}",
            f"output_dir={out}",
            "template=chatml",
            "cutoff_len=48",
            "per_device_train_batch_size=4",
            "learning_rate=1e-1",
            "lr_scheduler_type=constant",
            "logging_steps=5",
            "save_steps=1000",
            "stop_check_samples=0",
            "num_virtual_tokens=8",
            "seed=0",
            *extra,
        ],
    )


def _losses(out: Path) -> list[float]:
    lines = (out / callbacks.LOG_FILE).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def _reply(model_dir: Path, *adapters: Path) -> str:
    engine = ChatEngine(
        ModelConfig(
            model_name_or_path=str(model_dir),
            adapter_name_or_path=[str(a) for a in adapters] or None,
            template="chatml",
            device="cpu",
        )
    )
    messages = [{"role": "user", "content": QA[1][0]}]
    return engine.chat(messages, max_new_tokens=6, temperature=0).text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "loss_ratio"),
    [
        (("prefix",), 0.5),
        (("prefix", "prefix_projection=true", "prefix_hidden_size=32"), 0.5),
        # 8 input embeddings (512 numbers) move a random model's loss far less than keys and
        # values at every layer do
        (("prompt",), 0.9),
    ],
)
def test_virtual_tokens_learn_and_change_the_reply(
    learnable_tiny_dir, sft_file, tmp_path, method, loss_ratio
):
    out = tmp_path / "out"
    extra = [f"finetuning_type={method[0]}", *method[1:], "max_steps=30"]
    run_training(_config(learnable_tiny_dir, sft_file, out, *extra))
    losses = _losses(out)
    assert losses[-1] < loss_ratio * losses[0], losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method[0]]
    assert config["num_virtual_tokens"] == 8
    # inference keeps the adapter attached (nothing to merge) and its virtual tokens answer
    model, _ = load_model(
        ModelConfig(model_name_or_path=str(learnable_tiny_dir), adapter_name_or_path=[str(out)])
    )
    assert not decoder_runs_alone(model)
    assert _reply(learnable_tiny_dir, out) != _reply(learnable_tiny_dir)


def test_prefix_resume_matches_uninterrupted_run(tiny_llama_dir, sft_file, tmp_path, monkeypatch):
    args = ("finetuning_type=prefix", "max_steps=4", "save_steps=2")
    run_training(_config(tiny_llama_dir, sft_file, tmp_path / "full", *args))
    original = callbacks.InterruptCallback.on_step_end

    def press_ctrl_c_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.interrupted = True
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(callbacks.InterruptCallback, "on_step_end", press_ctrl_c_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(_config(tiny_llama_dir, sft_file, tmp_path / "cut", *args))
    monkeypatch.setattr(callbacks.InterruptCallback, "on_step_end", original)
    run_training(
        _config(tiny_llama_dir, sft_file, tmp_path / "cut", *args, "resume_from_checkpoint=true")
    )
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert list(full) == list(resumed)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-5)


def test_export_and_lora_on_top_refuse_to_merge_a_prefix(tiny_llama_dir, sft_file, tmp_path):
    prefix = tmp_path / "prefix"
    run_training(_config(tiny_llama_dir, sft_file, prefix, "finetuning_type=prefix", "max_steps=1"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "export",
            "--model",
            str(tiny_llama_dir),
            "--adapter",
            str(prefix),
            "--output",
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "PREFIX_TUNING" in done.stderr and "cannot be merged" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    config = _config(tiny_llama_dir, sft_file, tmp_path / "lora", "max_steps=1")
    config.model.adapter_name_or_path = [str(prefix)]
    with pytest.raises(ModelError, match="cannot be merged"):
        run_training(config)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("finetuning_type=prefix", "stage=dpo"), "available for stages pt, sft, not dpo"),
        (("finetuning_type=prompt", "packing=true"), "virtual tokens ignore position_ids"),
        (("finetuning_type=prompt", "prefix_projection=true"), "prefix_projection needs"),
        (("finetuning_type=lora", "prefix_projection=true"), "prefix_projection needs"),
    ],
)
def test_bad_combinations_are_refused(tiny_llama_dir, sft_file, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_llama_dir, sft_file, tmp_path / "out", *extra)


def test_pretraining_with_a_prefix_does_not_pack(tiny_llama_dir, sft_file, tmp_path):
    config = _config(
        tiny_llama_dir, sft_file, tmp_path / "out", "stage=pt", "finetuning_type=prefix"
    )
    assert config.data.packing is False


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generate_sees_the_virtual_tokens(tiny_llama, kind):
    """Cached generation equals greedy decoding by full forwards through peft's forward (the
    compat shim in `pass_virtual_tokens_to_generate`; without it transformers 5.25 drops them)."""
    from corral.model.adapters import apply_method

    model, _ = tiny_llama
    method = load_config(None, [f"finetuning_type={kind}", "num_virtual_tokens=4"]).method
    peft_model = apply_method(model, method).eval()
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.mul_(50)  # a prefix that changes the greedy tokens
        ids = torch.tensor([[1, 15, 27, 300, 42, 7, 99, 5]])
        generated = peft_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        greedy = ids
        for _ in range(5):
            step = peft_model(input_ids=greedy).logits[0, -1].argmax()
            greedy = torch.cat([greedy, step.view(1, 1)], dim=1)
        with peft_model.disable_adapter():
            base = peft_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert generated.tolist() == greedy.tolist()
    assert generated.tolist() != base.tolist()
