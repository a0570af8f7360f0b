"""rope_scaling: training past the model's context stretches RoPE as LLaMA-Factory does, and
the trained folder is loaded with the same settings for inference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.model.load import load_model
from corral.train import workflow


@pytest.fixture
def short_llama_dir(tiny_llama_dir, tmp_path):
    """The tiny Llama with a 64-token context."""
    folder = tmp_path / "short-llama"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def long_file(tmp_path):
    path = tmp_path / "long.json"
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = [
        {"instruction": f"Count from {w}.", "input": "", "output": " ".join(words[i:] * 12)}
        for i, w in enumerate(words[:6])
    ]
    path.write_text(json.dumps(rows))
    return path


def _train(model_dir, data_file, out, monkeypatch, *extra: str):
    trained = {}
    save_final = workflow.save_final

    def keep_model(trainer, *args, **kwargs):
        trained["model"] = trainer.model
        return save_final(trainer, *args, **kwargs)

    monkeypatch.setattr(workflow, "save_final", keep_model)
    config = load_config(
        None,
        [
            f"model_name_or_path={model_dir}",
            f"dataset={data_file}",
            f"output_dir={out}",
            "template=chatml",
            "cutoff_len=128",
            "lora_rank=4",
            "learning_rate=1e-2",
            "max_steps=2",
            "stop_check_samples=0",
            "seed=0",
            *extra,
        ],
    )
    workflow.run_training(config)
    return trained["model"].eval()


@torch.no_grad()
def _logits(model, length: int) -> torch.Tensor:
    return model(input_ids=torch.arange(1, length + 1).unsqueeze(0)).logits


def test_linear_scaling_trains_past_the_context_and_reloads_with_it(
    short_llama_dir, long_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    trained = _train(short_llama_dir, long_file, out, monkeypatch, "rope_scaling=linear")
    rope = trained.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)  # ceil(128 / 64)
    assert trained.config.max_position_embeddings == 128

    loaded, _ = load_model(
        ModelConfig(model_name_or_path=str(short_llama_dir), adapter_name_or_path=[str(out)])
    )
    assert loaded.config.rope_parameters == rope
    assert loaded.config.max_position_embeddings == 128
    # same positions, same model: the adapter on its base with the recorded rope is the trained one
    torch.testing.assert_close(_logits(loaded, 100), _logits(trained, 100), atol=1e-4, rtol=0)
    plain, _ = load_model(ModelConfig(model_name_or_path=str(short_llama_dir)))
    assert plain.config.rope_parameters["rope_type"] == "default"  # the base folder is untouched


@pytest.mark.parametrize(
    ("kind", "extra_keys"),
    [
        ("dynamic", {}),
        ("yarn", {"original_max_position_embeddings": 64}),
        ("llama3", {"original_max_position_embeddings": 64, "high_freq_factor": 4.0}),
    ],
)
def test_other_scalings_set_factor_and_original_length(short_llama_dir, kind, extra_keys):
    config = ModelConfig(model_name_or_path=str(short_llama_dir), rope_scaling=kind)
    model, _ = load_model(config, for_training=True, context_len=160)
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == (kind, 3.0)  # ceil(160 / 64)
    assert extra_keys.items() <= rope.items()
    assert model.config.max_position_embeddings == 160


def test_scaling_is_not_applied_when_cutoff_len_fits(short_llama_dir, caplog):
    config = ModelConfig(model_name_or_path=str(short_llama_dir), rope_scaling="linear")
    model, _ = load_model(config, for_training=True, context_len=64)
    assert model.config.rope_parameters["rope_type"] == "default"
    assert model.config.max_position_embeddings == 64
    assert "rope_scaling: linear not applied" in caplog.text
