"""PiSSA (pissa_init): LoRA starts from the weights' principal components and is saved as a
plain LoRA for the original base, so the output never needs PiSSA's residual base."""

from __future__ import annotations

import json

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.model.adapters import apply_method
from corral.model.load import load_model
from corral.train import workflow
from corral.utils.errors import ConfigError

INPUT_IDS = torch.tensor([[1, 15, 27, 300, 42, 7, 99, 5]])


def _config(model_dir, data_file, out, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={model_dir}",
            f"dataset={data_file}",
            f"output_dir={out}",
            "template=chatml",
            "cutoff_len=32",
            "lora_rank=4",
            "learning_rate=1e-2",
            "max_steps=3",
            "save_steps=2",
            "stop_check_samples=0",
            "fused_ops=false",
            "seed=0",
            "pissa_init=true",
            "pissa_convert=true",
            *extra,
        ],
    )


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.json"
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."} for w in "abcdefgh"]
    path.write_text(json.dumps(rows))
    return path


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("pissa_iter", [16, -1])
def test_pissa_starts_at_the_base_model(tiny_llama, tiny_llama_dir, pissa_iter):
    model, _ = tiny_llama
    base = _logits(model)
    config = load_config(
        None,
        [f"model_name_or_path={tiny_llama_dir}", "pissa_init=true", f"pissa_iter={pissa_iter}"],
    )
    pissa = apply_method(model, config.method).eval()
    lora_b = [p for n, p in pissa.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # not LoRA's B = 0 start
    torch.testing.assert_close(_logits(pissa), base, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused_ops", ["false", "true"])
def test_saved_adapter_on_the_original_base_is_the_trained_model(
    tiny_llama_dir, qa_file, tmp_path, monkeypatch, fused_ops
):
    trained = {}
    save_final = workflow.save_final

    def keep_model(trainer, *args, **kwargs):
        trained["model"] = trainer.model
        return save_final(trainer, *args, **kwargs)

    monkeypatch.setattr(workflow, "save_final", keep_model)
    out = tmp_path / "out"
    workflow.run_training(_config(tiny_llama_dir, qa_file, out, f"fused_ops={fused_ops}"))

    expected = _logits(trained["model"].eval())
    loaded, _ = load_model(
        ModelConfig(model_name_or_path=str(tiny_llama_dir), adapter_name_or_path=[str(out)])
    )
    base, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir)))
    assert not torch.allclose(_logits(base), expected, atol=1e-3)  # training changed the model
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=0)
    # peft's conversion: the trained minus the initial adapter, as one LoRA of twice the rank
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())["r"] == 8
    assert not (out / workflow.PISSA_START).exists()


def test_pissa_checks():
    with pytest.raises(ConfigError, match="pissa_init needs finetuning_type: lora"):
        load_config(None, ["finetuning_type=full", "pissa_init=true"])
    with pytest.raises(ConfigError, match="pissa_init is available for stages pt, sft, not dpo"):
        load_config(None, ["stage=dpo", "pissa_init=true"])
    with pytest.raises(ConfigError, match="pissa_convert needs pissa_init"):
        load_config(None, ["pissa_convert=true"])
    config = load_config(None, ["pissa_init=true"])  # LLaMA-Factory's default pissa_convert
    assert any("always saves the PiSSA adapter converted" in note for note in config.notes)
