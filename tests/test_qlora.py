"""QLoRA on CPU (bitsandbytes' CPU backend): a 4- or 8-bit base trains LoRA, the run records
its quantisation, and export merges the adapter into the full-precision base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.model.load import load_model
from corral.utils.errors import ConfigError, ModelError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
]
PROMPT = torch.tensor([[1, 400, 2000, 31, 7, 900, 45, 12]])


@pytest.fixture(scope="module")
def learnable_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny model with a 20x larger LM head, so frozen-head LoRA can lower the loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("qlora-base")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    (path.parent / "qa.json").write_text(
        json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA])
    )
    return path


def _corral(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # generous: CI machines may be busy
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _logits(model_config: ModelConfig) -> torch.Tensor:
    model, _ = load_model(model_config)
    with torch.no_grad():
        return model(PROMPT).logits[0].float()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_exports_into_the_full_precision_base(learnable_dir, tmp_path, bits):
    out, exported = tmp_path / "out", tmp_path / "exported"
    _corral(
        "train",
        f"model_name_or_path={learnable_dir}",
        f"dataset={learnable_dir.parent / 'qa.json'}",
        f"output_dir={out}",
        f"quantization_bit={bits}",
        "quantization_method=bnb",  # LLaMA-Factory's spelling
        "device=cpu",
        "template=chatml",
        "cutoff_len=64",
        "per_device_train_batch_size=4",
        "learning_rate=1e-2",
        "lr_scheduler_type=constant",
        "logging_steps=5",
        "max_steps=20",
        "stop_check_samples=0",
    )
    log = (out / "trainer_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log if '"loss"' in line]
    assert losses[-1] < 0.2 * losses[0], losses
    record = json.loads((out / "corral_run.json").read_text())["quantization"]
    expected = {"bits": bits, "method": "bitsandbytes"}
    if bits == 4:
        expected.update(type="nf4", double_quantization=True)
    assert record == expected
    said = _corral("export", "--adapter", str(out), "--output", str(exported)).stderr
    assert f"trained on a {bits}-bit" in said and "into the full-precision base" in said

    full = ModelConfig(model_name_or_path=str(learnable_dir), device="cpu")
    quantized = ModelConfig(
        model_name_or_path=str(learnable_dir), device="cpu", quantization_bit=bits
    )
    base, quantized_base = _logits(full), _logits(quantized)
    as_trained = _logits(ModelConfig(**{**vars(quantized), "adapter_name_or_path": [str(out)]}))
    merged = _logits(ModelConfig(model_name_or_path=str(exported), device="cpu"))
    # chat and serve load the full-precision base with the adapter merged: the export's model
    full_plus_adapter = _logits(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    # the export quantised again: the quantisation error at the trained model's scale
    requantized = _logits(ModelConfig(**{**vars(quantized), "model_name_or_path": str(exported)}))
    assert torch.allclose(full_plus_adapter, merged, atol=1e-4)
    # the adapter trained: the export moved far beyond the base's own quantisation error
    assert float((merged - base).abs().max()) > 10 * float((quantized_base - base).abs().max())
    # the model as trained (quantised base + adapter) differs from the full-precision export by
    # about what quantising the export does (measured: 0.92x at 4 bits, 0.94x at 8 bits)
    as_trained_error = float((as_trained - merged).abs().max())
    assert as_trained_error < 1.5 * float((requantized - merged).abs().max())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["quantization_bit=3"],
            "quantization_bit: 3 is not supported; bitsandbytes quantises to 4 or 8",
        ),
        (
            ["quantization_bit=4", "finetuning_type=full"],
            "quantization_bit: 4 needs finetuning_type: lora",
        ),
        (
            ["quantization_bit=4", "quantization_type=int4"],
            "quantization_type: 'int4' is not one of: nf4, fp4",
        ),
        (
            ["quantization_bit=8", "quantization_method=hqq"],
            "quantization_method: 'hqq' is not one of",
        ),
        (["quantization_bit=4", "pissa_init=true"], "pissa_init with quantization_bit"),
    ],
)
def test_bad_quantization_settings_are_one_clear_error(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, override)
    assert message in str(caught.value)
    assert len(caught.value.problems) == 1


def test_a_device_bitsandbytes_cannot_serve_is_an_error_not_full_precision():
    from corral.model.quantize import check_backend

    with pytest.raises(
        ModelError, match="cannot quantise on device meta .*remove quantization_bit"
    ):
        check_backend(4, torch.device("meta"))


def test_fused_ops_leave_quantised_layers_alone_and_the_loss_unchanged(learnable_dir):
    from corral.model.adapters import apply_method
    from corral.model.fused import fuse_for_training, unfuse
    from corral.train.loss import causal_lm_loss

    config = ModelConfig(model_name_or_path=str(learnable_dir), device="cpu", quantization_bit=4)
    model, _ = load_model(config, for_training=True)
    model = apply_method(model, load_config(None, ["quantization_bit=4"]).method)
    model.train()

    def loss_and_grads():
        model.zero_grad()
        hidden = model.get_decoder()(input_ids=PROMPT).last_hidden_state
        loss = causal_lm_loss(hidden, PROMPT, model.get_output_embeddings())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = loss_and_grads()
    counts = fuse_for_training(model)
    # the RMSNorms fuse; the 4-bit linears (and the MLPs around them) keep peft's forwards
    assert counts == {"mlp": 0, "lora": 0, "norm": 5}
    fused = loss_and_grads()
    unfuse(model)
    assert torch.allclose(plain[0], fused[0], atol=1e-5)
    for a, b in zip(plain[1], fused[1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_dora_trains_on_a_quantised_base(learnable_dir):
    from corral.model.adapters import apply_method

    config = ModelConfig(model_name_or_path=str(learnable_dir), device="cpu", quantization_bit=4)
    model, _ = load_model(config, for_training=True)
    model = apply_method(model, load_config(None, ["quantization_bit=4", "use_dora=true"]).method)
    model.train()
    model(input_ids=PROMPT, labels=PROMPT).loss.backward()
    magnitudes = [p.grad for name, p in model.named_parameters() if "magnitude" in name]
    assert len(magnitudes) == 14  # every linear of the 2 blocks
    assert all(g is not None and g.abs().sum() > 0 for g in magnitudes)
